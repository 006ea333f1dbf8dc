//! The operator's commands on a running agent, served by the endpoint: the dead
//! letters (`GET /dead-letters`, `POST /dead-letters/retry`, `POST
//! /dead-letters/purge` with a JSON `Which`). `edgerelay dead-letters` uses these while
//! the agent runs, and the buffer file directly while it does not.

use bytes::Bytes;
use hyper::{Method, StatusCode};

use super::http::{Admin, AdminAnswer};
use crate::store::dead::Which;
use crate::store::Store;

/// Dead letters listed at most, by one request.
pub const LIST_LIMIT: usize = 10_000;

#[derive(Debug, Clone)]
pub struct DeadLetterAdmin {
    pub store: Store,
}

fn json(v: serde_json::Value) -> String {
    v.to_string()
}

impl Admin for DeadLetterAdmin {
    fn handle(&self, method: Method, path: String, body: Bytes) -> AdminAnswer<'_> {
        Box::pin(async move {
            let op = match (method, path.as_str()) {
                (Method::GET, "/dead-letters") => {
                    return Some(match self.store.dead_letters(LIST_LIMIT).await {
                        Ok(list) => (
                            StatusCode::OK,
                            serde_json::to_string(&list).unwrap_or_default(),
                        ),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            json(serde_json::json!({ "error": e.to_string() })),
                        ),
                    });
                }
                (Method::POST, "/dead-letters/retry") => "retried",
                (Method::POST, "/dead-letters/purge") => "purged",
                _ => return None,
            };
            let which: Which = match serde_json::from_slice(&body) {
                Ok(w) => w,
                Err(e) => {
                    return Some((
                        StatusCode::BAD_REQUEST,
                        json(
                            serde_json::json!({ "error": format!("expected \"All\" or {{\"Some\": [[stream, seq], …]}}: {e}") }),
                        ),
                    ))
                }
            };
            let done = if op == "retried" {
                self.store.retry_dead_letters(which).await
            } else {
                self.store.purge_dead_letters(which).await
            };
            Some(match done {
                Ok(n) => (StatusCode::OK, json(serde_json::json!({ op: n }))),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json(serde_json::json!({ "error": e.to_string() })),
                ),
            })
        })
    }
}
