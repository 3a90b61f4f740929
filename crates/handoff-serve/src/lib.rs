//! `handoff serve`: a text model behind HTTP, loaded once at start-up.
//!
//! `POST /embed` with `{"texts": ["...", ...]}` answers
//! `{"embeddings": [[...], ...]}` (the model's last output, one row per
//! text); for a classifier (last output `logits`), `POST /predict` with
//! `{"text": "..."}` answers `{"label": "...", "score": 0.97}` (softmax of
//! the logits, labels from `config.json`'s `id2label`), the endpoint of a
//! transformers text-classification pipeline behind FastAPI; `GET /health`
//! answers once the model is loaded. Texts are
//! tokenised padded to `seq`, as in the suite's cases, so a served request
//! costs what a benchmarked batch costs plus HTTP and JSON.
//!
//! One model thread owns the session and serves requests in arrival order
//! (the runtimes' sessions are not shared across threads); the HTTP side
//! runs on a single-threaded tokio runtime and only parses and queues. The
//! FastAPI service in `scripts/fastapi_server.py` is built the same way, so
//! the two differ in language and stack, not in architecture.
//!
//! Overload and bad input get answers, not a slower or dead server (see
//! [`Limits`]): a bounded queue sheds load with 503 + `Retry-After`, bodies
//! and texts have size limits (413, 422), a request unanswered in time gets
//! 504, every error is `{"error": "..."}`, and batch sizes are rounded up to
//! powers of two, whose log2(max_batch) + 1 sessions are all loaded before
//! the server says it is ready: no request waits behind a session load.
//! SIGTERM or Ctrl-C stops accepting and finishes the requests in flight.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::mpsc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use handoff_backend::{
    Backend, BackendError, Device, ModelRef, PrepareOptions, Prepared, Tensor, TensorData,
    TensorSpec,
};
use serde::{Deserialize, Serialize};
use tokenizers::Tokenizer;
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(
        "port {port} on {ip} is already in use (another `handoff serve`?); pick another with --port, or --port 0 for any free port"
    )]
    PortInUse { ip: std::net::IpAddr, port: u16 },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("{path}: {detail}")]
    Model { path: PathBuf, detail: String },
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("server: {0}")]
    Runtime(#[from] std::io::Error),
}

/// What to serve and how.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub model: ModelRef,
    pub device: Device,
    pub threads: usize,
    /// Tokens per text (padding and truncation).
    pub seq: usize,
    pub tokenizer: PathBuf,
    /// `127.0.0.1:0` picks a free port.
    pub addr: SocketAddr,
    /// Most texts in one request (and in one dynamically batched call).
    pub max_batch: usize,
    pub limits: Limits,
    /// Dynamic batching: the model thread waits up to this long after a
    /// request for more to run with it in one call (up to `max_batch`
    /// texts). Zero: every request runs alone, as it arrives.
    pub batch_wait: std::time::Duration,
    /// The backend's settings, as a suite's `backend_options` gives them
    /// (`{"denormals": "flush"}` for ort); `Null`: its defaults.
    pub backend_options: serde_json::Value,
}

/// What a request may cost the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests waiting for the model thread; beyond it, 503 with
    /// `Retry-After: 1`.
    pub queue: usize,
    /// Largest request body in bytes (413 beyond).
    pub body_bytes: usize,
    /// Longest text in bytes (422 beyond). Tokens past `seq` are cut
    /// anyway; this bounds the tokenizer's work and the memory a request
    /// holds while it waits.
    pub text_bytes: usize,
    /// A request not answered in this time gets 504 (the model thread
    /// skips it if it has not started it).
    pub timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue: 64,
            body_bytes: 1 << 20,
            text_bytes: 16 << 10,
            timeout: std::time::Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Deserialize)]
struct EmbedRequest {
    texts: Vec<String>,
}

#[derive(Debug, Serialize)]
struct EmbedResponse {
    embeddings: Vec<Vec<f32>>,
}

#[derive(Debug, Deserialize)]
struct PredictRequest {
    text: String,
}

#[derive(Debug, Serialize, PartialEq)]
struct Prediction {
    label: String,
    score: f32,
}

/// The top label and its softmax probability, as the text-classification
/// pipeline reports them.
fn predict(logits: &[f32], labels: &[String]) -> Option<Prediction> {
    let (best, top) = logits
        .iter()
        .copied()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(&b.1))?;
    let sum: f32 = logits.iter().map(|l| (l - top).exp()).sum();
    Some(Prediction {
        label: labels
            .get(best)
            .cloned()
            .unwrap_or_else(|| format!("LABEL_{best}")),
        score: 1.0 / sum,
    })
}

/// The labels of a classifier (`config.json`'s `id2label` in the HF
/// directory, else `LABEL_i`); `None` when the model's last output is not
/// `logits`.
fn classifier_labels(config: &ServeConfig) -> Result<Option<Vec<String>>, ServeError> {
    let info =
        handoff_onnx::ModelInfo::load(&config.model.path).map_err(|e| ServeError::Model {
            path: config.model.path.clone(),
            detail: e.to_string(),
        })?;
    let Some(last) = info.outputs.last().filter(|o| o.name == "logits") else {
        return Ok(None);
    };
    let width = last
        .dims
        .as_ref()
        .and_then(|d| d.last())
        .and_then(|d| match d {
            handoff_onnx::inspect::Dim::Fixed(v) => usize::try_from(*v).ok(),
            _ => None,
        })
        .unwrap_or(0);
    let id2label: Option<serde_json::Map<String, serde_json::Value>> = config
        .model
        .hf_dir
        .as_ref()
        .and_then(|d| std::fs::read(d.join("config.json")).ok())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|c| c.get("id2label")?.as_object().cloned());
    let n = width.max(id2label.as_ref().map_or(0, |m| m.len()));
    Ok(Some(
        (0..n)
            .map(|i| {
                id2label
                    .as_ref()
                    .and_then(|m| m.get(&i.to_string()))
                    .and_then(|v| v.as_str())
                    .map_or_else(|| format!("LABEL_{i}"), str::to_owned)
            })
            .collect(),
    ))
}

type Reply = oneshot::Sender<Result<Vec<Vec<f32>>, String>>;

#[derive(Clone)]
struct AppState {
    queue: mpsc::SyncSender<(Vec<String>, Reply)>,
    max_batch: usize,
    limits: Limits,
    info: serde_json::Value,
    /// A classifier's labels; `None`: /predict answers 404.
    labels: Option<std::sync::Arc<Vec<String>>>,
}

/// `{"error": "..."}` with a status (and `Retry-After` on 503).
fn error(status: StatusCode, message: impl Into<String>) -> Response {
    let body = Json(serde_json::json!({ "error": message.into() }));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        (status, [(header::RETRY_AFTER, "1")], body).into_response()
    } else {
        (status, body).into_response()
    }
}

/// Binds the address first, so a port in use is an error before minutes of
/// model loading.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr).map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            ServeError::PortInUse {
                ip: addr.ip(),
                port: addr.port(),
            }
        } else {
            ServeError::Listen { addr, source }
        }
    })
}

/// Loads the model, calls `ready` with the bound address, then serves until
/// the process ends.
pub fn serve(
    backend: &dyn Backend,
    config: &ServeConfig,
    listener: TcpListener,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = listener.local_addr()?;
    let (tx, rx) = mpsc::sync_channel::<(Vec<String>, Reply)>(config.limits.queue.max(1));
    let labels = classifier_labels(config)?;
    let state = AppState {
        queue: tx,
        max_batch: config.max_batch,
        labels: labels.map(std::sync::Arc::new),
        limits: config.limits,
        info: serde_json::json!({
            "status": "ok",
            "model": config.model.id,
            "backend": backend.name(),
            "threads": config.threads,
            "seq": config.seq,
            "batch_wait_ms": config.batch_wait.as_secs_f64() * 1e3,
        }),
    };
    std::thread::scope(|s| -> Result<(), ServeError> {
        // Sessions are not Send: the model thread loads its own.
        let (loaded_tx, loaded_rx) = mpsc::channel::<Result<(), ServeError>>();
        s.spawn(move || {
            let model = Model::load(backend, config).and_then(|mut m| {
                // Every batch size's session is loaded and run once before
                // /health answers: a call of a size not loaded yet would
                // stall every request queued behind it.
                let largest = bucket(config.max_batch);
                let mut n = 1;
                while n <= largest {
                    m.embed(&vec!["warm-up".to_owned(); n])?;
                    n *= 2;
                }
                Ok(m)
            });
            let mut model = match model {
                Ok(m) => {
                    let _ = loaded_tx.send(Ok(()));
                    m
                }
                Err(e) => {
                    let _ = loaded_tx.send(Err(e));
                    return;
                }
            };
            let mut next = None;
            loop {
                let Some(first) = next.take().or_else(|| rx.recv().ok()) else {
                    break;
                };
                let (mut group, carried) = gather(&rx, first, config.batch_wait, config.max_batch);
                next = carried;
                // Their clients gave up (timeout, closed connection): no work.
                group.retain(|(_, reply)| !reply.is_closed());
                if group.is_empty() {
                    continue;
                }
                let texts: Vec<String> =
                    group.iter().flat_map(|(t, _)| t.iter().cloned()).collect();
                match model.embed(&texts) {
                    Ok(rows) => {
                        let mut rows = rows.into_iter();
                        for (t, reply) in group {
                            let _ = reply.send(Ok(rows.by_ref().take(t.len()).collect()));
                        }
                    }
                    Err(e) => {
                        let e = e.to_string();
                        for (_, reply) in group {
                            let _ = reply.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        loaded_rx
            .recv()
            .map_err(|_| ServeError::Runtime(std::io::Error::other("model thread ended")))??;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let app = Router::new()
                .route("/embed", post(embed))
                .route("/predict", post(predict_one))
                .route("/health", get(health))
                .layer(DefaultBodyLimit::max(state.limits.body_bytes))
                .with_state(state);
            ready(addr);
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown_signal())
                .await
        })?;
        Ok(())
    })
}

type Job = (Vec<String>, Reply);

/// The requests that run with `first` in one call: those arriving within
/// `wait` of it, while the texts fit in `max_texts`; the request that did
/// not fit comes back to open the next call.
fn gather(
    rx: &mpsc::Receiver<Job>,
    first: Job,
    wait: std::time::Duration,
    max_texts: usize,
) -> (Vec<Job>, Option<Job>) {
    let mut texts = first.0.len();
    let mut group = vec![first];
    if wait.is_zero() {
        return (group, None);
    }
    let deadline = std::time::Instant::now() + wait;
    while texts < max_texts {
        match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
            Ok(job) if texts + job.0.len() <= max_texts => {
                texts += job.0.len();
                group.push(job);
            }
            Ok(job) => return (group, Some(job)),
            Err(_) => break,
        }
    }
    (group, None)
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(state.info.clone())
}

/// SIGTERM or Ctrl-C: stop accepting, let the requests in flight finish.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

async fn embed(
    State(state): State<AppState>,
    body: Result<Json<EmbedRequest>, JsonRejection>,
) -> Response {
    let req = match body {
        Ok(Json(req)) => req,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    if req.texts.is_empty() || req.texts.len() > state.max_batch {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("`texts` must hold 1 to {} strings", state.max_batch),
        );
    }
    if let Some((i, t)) = req
        .texts
        .iter()
        .enumerate()
        .find(|(_, t)| t.len() > state.limits.text_bytes)
    {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "`texts[{i}]` is {} bytes; the limit is {}",
                t.len(),
                state.limits.text_bytes
            ),
        );
    }
    match run_model(&state, req.texts).await {
        Ok(embeddings) => Json(EmbedResponse { embeddings }).into_response(),
        Err(response) => response,
    }
}

async fn predict_one(
    State(state): State<AppState>,
    body: Result<Json<PredictRequest>, JsonRejection>,
) -> Response {
    let Some(labels) = state.labels.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "this model is not a classifier (its last output is not `logits`): use /embed",
        );
    };
    let req = match body {
        Ok(Json(req)) => req,
        Err(rejection) => return error(rejection.status(), rejection.body_text()),
    };
    if req.text.len() > state.limits.text_bytes {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "`text` is {} bytes; the limit is {}",
                req.text.len(),
                state.limits.text_bytes
            ),
        );
    }
    match run_model(&state, vec![req.text]).await {
        Ok(rows) => match rows.first().and_then(|l| predict(l, &labels)) {
            Some(p) => Json(p).into_response(),
            None => error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model gave no logits",
            ),
        },
        Err(response) => response,
    }
}

/// Queues `texts` for the model thread and waits for its rows; `Err` is the
/// answer to send instead (overloaded, timed out, failed).
async fn run_model(state: &AppState, texts: Vec<String>) -> Result<Vec<Vec<f32>>, Response> {
    let (tx, rx) = oneshot::channel();
    match state.queue.try_send((texts, tx)) {
        Ok(()) => {}
        Err(mpsc::TrySendError::Full(_)) => {
            return Err(error(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "overloaded: {} requests are already waiting; retry later",
                    state.limits.queue
                ),
            ));
        }
        Err(mpsc::TrySendError::Disconnected(_)) => {
            return Err(error(StatusCode::SERVICE_UNAVAILABLE, "model thread ended"));
        }
    }
    match tokio::time::timeout(state.limits.timeout, rx).await {
        Ok(Ok(Ok(rows))) => Ok(rows),
        Ok(Ok(Err(e))) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Ok(Err(_)) => Err(error(StatusCode::SERVICE_UNAVAILABLE, "model thread ended")),
        Err(_) => Err(error(
            StatusCode::GATEWAY_TIMEOUT,
            format!("no answer within {:?}", state.limits.timeout),
        )),
    }
}

/// The tokenizer and one prepared session per batch size seen (some
/// runtimes, tract among them, specialise a session to its input shapes).
struct Model<'b> {
    backend: &'b dyn Backend,
    config: ServeConfig,
    tokenizer: Tokenizer,
    /// Model inputs among `input_ids`, `attention_mask`, `token_type_ids`.
    inputs: Vec<String>,
    sessions: HashMap<usize, Box<dyn Prepared>>,
}

impl<'b> Model<'b> {
    fn load(backend: &'b dyn Backend, config: &ServeConfig) -> Result<Self, ServeError> {
        let tokenizer = handoff_backend::text::load_fixed_length(&config.tokenizer, config.seq)
            .map_err(|e| ServeError::Tokenizer {
                path: config.tokenizer.clone(),
                detail: e.to_string(),
            })?;
        let info =
            handoff_onnx::ModelInfo::load(&config.model.path).map_err(|e| ServeError::Model {
                path: config.model.path.clone(),
                detail: e.to_string(),
            })?;
        let known = ["input_ids", "attention_mask", "token_type_ids"];
        let inputs: Vec<String> = info.inputs.iter().map(|i| i.name.clone()).collect();
        if let Some(other) = inputs.iter().find(|n| !known.contains(&n.as_str())) {
            return Err(ServeError::Model {
                path: config.model.path.clone(),
                detail: format!(
                    "input `{other}` is not one a tokenizer fills (input_ids, attention_mask, token_type_ids)"
                ),
            });
        }
        Ok(Self {
            backend,
            config: config.clone(),
            tokenizer,
            inputs,
            sessions: HashMap::new(),
        })
    }

    fn embed(&mut self, texts: &[String]) -> Result<Vec<Vec<f32>>, ServeError> {
        // Rounded up to a power of two (padded with empty texts), so a
        // client cycling through batch sizes cannot make the model thread
        // load a session per size.
        let (asked, batch) = (texts.len(), bucket(texts.len()));
        let mut texts = texts.to_vec();
        texts.resize(batch, String::new());
        let enc = self
            .tokenizer
            .encode_batch(texts, true)
            .map_err(|e| ServeError::Tokenizer {
                path: self.config.tokenizer.clone(),
                detail: format!("cannot encode: {e}"),
            })?;
        let seq = self.config.seq;
        let tensors: Vec<Tensor> = self
            .inputs
            .iter()
            .map(|name| {
                let field = |e: &tokenizers::Encoding| -> Vec<u32> {
                    match name.as_str() {
                        "input_ids" => e.get_ids().to_vec(),
                        "attention_mask" => e.get_attention_mask().to_vec(),
                        _ => e.get_type_ids().to_vec(),
                    }
                };
                Tensor {
                    name: name.clone(),
                    shape: vec![batch, seq],
                    data: TensorData::I64(
                        enc.iter()
                            .flat_map(|e| field(e).into_iter().map(i64::from))
                            .collect(),
                    ),
                }
            })
            .collect();
        if !self.sessions.contains_key(&batch) {
            let options = PrepareOptions {
                device: self.config.device,
                threads: self.config.threads,
                inputs: tensors
                    .iter()
                    .map(|t| TensorSpec {
                        name: t.name.clone(),
                        dtype: t.data.dtype(),
                        shape: t.shape.clone(),
                        fill: handoff_backend::Fill::Constant(0.0),
                    })
                    .collect(),
                options: self.config.backend_options.clone(),
            };
            let prepared = self.backend.prepare(&self.config.model, &options)?;
            self.sessions.insert(batch, prepared);
        }
        let session = self.sessions.get_mut(&batch).expect("inserted above");
        session.bind(&tensors)?;
        session.run()?;
        let outputs = session.outputs()?;
        let last = outputs
            .last()
            .ok_or_else(|| BackendError::Failed("the model has no outputs".into()))?;
        let TensorData::F32(values) = &last.data else {
            return Err(BackendError::Failed("the last output is not f32".into()).into());
        };
        let width = values.len() / batch.max(1);
        Ok(values
            .chunks(width.max(1))
            .take(asked)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// The batch a request of `n` texts runs as.
fn bucket(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_prediction_is_the_top_label_and_its_softmax_probability() {
        let labels = vec!["NEGATIVE".to_owned(), "POSITIVE".to_owned()];
        let p = super::predict(&[0.0, 2.0_f32.ln()], &labels).unwrap();
        assert_eq!(p.label, "POSITIVE");
        assert!((p.score - 2.0 / 3.0).abs() < 1e-6, "{p:?}");
        // Labels the config does not name.
        assert_eq!(
            super::predict(&[1.0, 0.0, 3.0], &[]).unwrap().label,
            "LABEL_2"
        );
        assert_eq!(super::predict(&[], &labels), None);
    }

    #[test]
    fn batch_sizes_round_up_to_powers_of_two() {
        let sizes: Vec<usize> = [1, 2, 3, 5, 8, 9, 33, 64].map(super::bucket).to_vec();
        assert_eq!(sizes, [1, 2, 4, 8, 8, 16, 64, 64]);
    }
}
