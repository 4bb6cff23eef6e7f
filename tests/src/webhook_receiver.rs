//! A webhook receiver for tests, on loopback: it records every delivery (headers and raw
//! body) and answers from a script, in order (then 200): a status, or `HANG` to hold the
//! request past the sender's time limit.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};

/// Script entry that never answers (the sender must time out).
pub const HANG: u16 = 0;

/// One received request.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// What the receiver answered (HANG: nothing).
    pub answered: u16,
}

impl Delivery {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Default)]
pub struct WebhookReceiver {
    script: Arc<Mutex<VecDeque<u16>>>,
    got: Arc<Mutex<Vec<Delivery>>>,
    /// `http://127.0.0.1:PORT/hook`.
    pub url: String,
}

impl WebhookReceiver {
    /// Start on a free loopback port with `script`.
    pub async fn start(script: Vec<u16>) -> anyhow::Result<WebhookReceiver> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let r = WebhookReceiver {
            script: Arc::new(Mutex::new(script.into())),
            got: Arc::default(),
            url: format!("http://{addr}/hook"),
        };
        let state = r.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move { state.receive(headers, body).await }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("webhook receiver stopped: {e}");
            }
        });
        Ok(r)
    }

    async fn receive(&self, headers: HeaderMap, body: Bytes) -> StatusCode {
        let next = self
            .script
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
            .unwrap_or(200);
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
            .collect();
        self.got
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Delivery {
                headers,
                body: body.to_vec(),
                answered: next,
            });
        if next == HANG {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        StatusCode::from_u16(next).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Every request received so far.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.got.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}
