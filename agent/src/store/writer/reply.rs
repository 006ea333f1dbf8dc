//! The writer's replies: held back until the transaction that decides them has
//! committed (or failed), so nothing is acknowledged before it is durable.

use tokio::sync::oneshot;

use super::super::{AppendError, Refused, Request, StoreError, StreamId};

/// A reply held back until the transaction that decides it has committed.
pub(super) enum Reply {
    Stream(
        oneshot::Sender<Result<StreamId, StoreError>>,
        Result<StreamId, StoreError>,
    ),
    /// The record is kept until the commit decides: a commit that fails for lack of
    /// space gives it back to its producer, which holds it and tries again.
    Append(
        oneshot::Sender<Result<u64, Refused>>,
        Result<u64, Refused>,
        crate::record::OriginKind,
        Option<crate::record::Record>,
    ),
    Ack(Option<oneshot::Sender<Result<(), AppendError>>>),
    Maintain(oneshot::Sender<()>),
    Discard(oneshot::Sender<Result<u64, AppendError>>, u64),
}

impl Reply {
    pub(super) fn send(self) {
        match self {
            Reply::Stream(tx, r) => {
                let _ = tx.send(r);
            }
            Reply::Append(tx, r, source, _) => {
                count_append(source, r.as_ref().err().map(|e| &e.error));
                let _ = tx.send(r);
            }
            Reply::Ack(Some(tx)) => {
                let _ = tx.send(Ok(()));
            }
            Reply::Ack(None) => {}
            Reply::Maintain(tx) => {
                let _ = tx.send(());
            }
            Reply::Discard(tx, n) => {
                let _ = tx.send(Ok(n));
            }
        }
    }

    /// The transaction failed: nothing in it is durable. After an I/O failure (`io`:
    /// ENOSPC, say) an append is answered as if the buffer were full, with its record,
    /// so its producer holds it (no acknowledgement) and tries again when space frees.
    pub(super) fn fail(self, detail: &str, io: bool) {
        match self {
            Reply::Append(tx, r, source, kept) if io => {
                let record = kept.or_else(|| r.err().and_then(|refused| refused.record));
                count_append(source, Some(&AppendError::Full));
                let _ = tx.send(Err(Refused {
                    error: AppendError::Full,
                    record,
                }));
            }
            Reply::Stream(tx, _) => {
                let _ = tx.send(Err(StoreError::Storage {
                    path: Default::default(),
                    detail: detail.to_owned(),
                }));
            }
            Reply::Append(tx, r, source, _) => {
                let error = AppendError::Storage(detail.to_owned());
                count_append(source, Some(&error));
                let record = r.err().and_then(|refused| refused.record);
                let _ = tx.send(Err(Refused { error, record }));
            }
            Reply::Ack(Some(tx)) => {
                let _ = tx.send(Err(AppendError::Storage(detail.to_owned())));
            }
            Reply::Ack(None) => {}
            Reply::Maintain(tx) => {
                let _ = tx.send(());
            }
            Reply::Discard(tx, _) => {
                let _ = tx.send(Err(AppendError::Storage(detail.to_owned())));
            }
        }
    }
}

/// While the file cannot be written: appends go back to their producers as if the
/// buffer were full (held, retried when space frees); anything else is dropped, which
/// its caller sees as an error.
pub(super) fn refuse_while_broken(batch: Vec<Request>) {
    for req in batch {
        if let Request::Append { record, reply, .. } = req {
            let _ = reply.send(Err(Refused {
                error: AppendError::Full,
                record: Some(record),
            }));
        }
    }
}

/// Count a decided append into the metrics (accepted: committed, so acknowledged).
fn count_append(source: crate::record::OriginKind, error: Option<&AppendError>) {
    let m = crate::telemetry::metrics();
    let source = source.as_str();
    match error {
        None => m
            .accepted
            .get_or_create(&crate::telemetry::labels(&[("source", source)]))
            .inc(),
        Some(e) => m
            .rejected
            .get_or_create(&crate::telemetry::labels(&[
                ("source", source),
                ("reason", e.reason()),
            ]))
            .inc(),
    };
}
