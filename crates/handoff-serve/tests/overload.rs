//! `handoff serve` under more load than it can take and under bad input:
//! a model that takes 20 ms a call behind a queue of two, sixteen clients
//! at once, then bodies and texts over the limits and broken JSON. Every
//! request gets an answer (200, or 503 with Retry-After when the queue is
//! full, or the 4xx naming its fault), and the server answers normally
//! afterwards.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use handoff_backend::{
    Backend, BackendError, Device, ExecutionKind, ModelRef, PrepareOptions, Prepared, Probe,
    Tensor, TensorData,
};
use handoff_onnx::ElemType;
use handoff_onnx::builder::{D, GraphBuilder, write_model};
use handoff_serve::{Limits, ServeConfig};

/// 20 ms a call, one f32 per text: its token count (so a test can tell
/// whose row a client got back). Counts its calls.
struct Slow;

struct SlowSession {
    batch: usize,
    tokens: Vec<f32>,
}

static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static SESSIONS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// The backend settings each session was prepared with.
static OPTIONS: std::sync::Mutex<Vec<serde_json::Value>> = std::sync::Mutex::new(Vec::new());

impl Backend for Slow {
    fn name(&self) -> &'static str {
        "slow"
    }
    fn execution_kind(&self) -> ExecutionKind {
        ExecutionKind::Mock
    }
    fn probe(&self, _: Device) -> Probe {
        Probe::Available {
            version: "0".into(),
            detail: String::new(),
        }
    }
    fn prepare(&self, _: &ModelRef, o: &PrepareOptions) -> Result<Box<dyn Prepared>, BackendError> {
        SESSIONS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        OPTIONS.lock().unwrap().push(o.options.clone());
        Ok(Box::new(SlowSession {
            batch: o.inputs[0].shape[0],
            tokens: Vec::new(),
        }))
    }
}

impl Prepared for SlowSession {
    fn bind(&mut self, inputs: &[Tensor]) -> Result<(), BackendError> {
        let mask = inputs.iter().find(|t| t.name == "attention_mask").unwrap();
        let TensorData::I64(m) = &mask.data else {
            panic!("an i64 mask")
        };
        self.tokens = m
            .chunks(mask.shape[1])
            .map(|row| row.iter().sum::<i64>() as f32)
            .collect();
        Ok(())
    }
    fn run(&mut self) -> Result<(), BackendError> {
        CALLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(20));
        Ok(())
    }
    fn outputs(&mut self) -> Result<Vec<Tensor>, BackendError> {
        Ok(vec![Tensor {
            name: "y".into(),
            shape: vec![self.batch, 1],
            data: TensorData::F32(self.tokens.clone()),
        }])
    }
}

/// Status line code, headers and body of one request on a new connection.
fn send(addr: SocketAddr, body: &[u8]) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!(
        "POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, head.to_owned(), body.to_owned())
}

fn start(dir: &std::path::Path, queue: usize, batch_wait: Duration) -> SocketAddr {
    start_with_timeout(dir, queue, batch_wait, Duration::from_secs(10))
}

fn start_with_timeout(
    dir: &std::path::Path,
    queue: usize,
    batch_wait: Duration,
    timeout: Duration,
) -> SocketAddr {
    let mut g = GraphBuilder::new("m");
    for name in ["input_ids", "attention_mask"] {
        let x = g.input(name, ElemType::I64, &[D::Sym("batch"), D::Sym("seq")]);
        g.node_to("Identity", &[&x], vec![], &format!("{name}_out"));
        g.output(
            &format!("{name}_out"),
            ElemType::I64,
            &[D::Sym("batch"), D::Sym("seq")],
        );
    }
    let model = dir.join("m.onnx");
    write_model(&g.finish(13), &model).unwrap();
    let tokenizer = dir.join("tokenizer.json");
    std::fs::write(
        &tokenizer,
        r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
            "decoder": null, "model": {"type": "WordLevel", "vocab": {"[PAD]": 0, "[UNK]": 1, "a": 2}, "unk_token": "[UNK]"}}"#,
    )
    .unwrap();
    let config = ServeConfig {
        model: ModelRef {
            path: model,
            id: "m".into(),
            hf_dir: None,
        },
        device: Device::Cpu,
        threads: 1,
        seq: 8,
        tokenizer,
        addr: "127.0.0.1:0".parse().unwrap(),
        max_batch: 8,
        batch_wait,
        backend_options: serde_json::json!({"denormals": "flush"}),
        limits: Limits {
            queue,
            body_bytes: 4096,
            text_bytes: 100,
            timeout,
        },
    };
    let listener = handoff_serve::bind(config.addr).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        handoff_serve::serve(&Slow, &config, listener, |a| tx.send(a).unwrap()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap()
}

#[test]
fn overload_is_shed_with_503_bad_input_gets_4xx_and_service_continues() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path(), 2, Duration::ZERO);
    let sessions = || SESSIONS.load(std::sync::atomic::Ordering::SeqCst);
    // Batch sizes 1, 2, 4 and 8 (`max_batch` 8), loaded before it is ready,
    // each with the backend settings the server was given.
    assert_eq!(sessions(), 4);
    let options = OPTIONS.lock().unwrap().clone();
    assert_eq!(options, vec![serde_json::json!({"denormals": "flush"}); 4]);
    let ok = br#"{"texts": ["a a"]}"#;
    // Sixteen clients against a 20 ms model and a queue of two.
    let answers: Vec<(u16, String, String)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..16)
            .map(|_| s.spawn(|| (0..5).map(|_| send(addr, ok)).collect::<Vec<_>>()))
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    let count = |code: u16| answers.iter().filter(|a| a.0 == code).count();
    assert_eq!(count(200) + count(503), answers.len(), "{answers:?}");
    assert!(count(200) > 0 && count(503) > 0, "{answers:?}");
    let shed = answers.iter().find(|a| a.0 == 503).unwrap();
    assert!(
        shed.1.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        shed.1
    );
    assert!(shed.2.contains("overloaded"), "{}", shed.2);

    // Bad input: each refused with its own code and a JSON error.
    let big = format!(r#"{{"texts": ["{}"]}}"#, "a ".repeat(3000));
    let long = format!(r#"{{"texts": ["{}"]}}"#, "a".repeat(200));
    for (body, code, says) in [
        (big.as_bytes(), 413, "length limit"),
        (
            long.as_bytes(),
            422,
            "`texts[0]` is 200 bytes; the limit is 100",
        ),
        (br#"{"texts": ["#.as_slice(), 400, "Failed to parse"),
        (br#"{"texts": 3}"#.as_slice(), 422, "invalid type"),
        (br#"{"texts": []}"#.as_slice(), 422, "1 to 8 strings"),
    ] {
        let (got, _, text) = send(addr, body);
        assert_eq!(got, code, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].as_str().unwrap().contains(says), "{text}");
    }
    // And it still serves, every batch size through one of few sessions.
    for n in [1, 3, 5] {
        let texts = vec!["a"; n];
        let body = serde_json::to_vec(&serde_json::json!({ "texts": texts })).unwrap();
        let (code, _, text) = send(addr, &body);
        assert_eq!(code, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["embeddings"].as_array().unwrap().len(), n, "{text}");
    }
    assert_eq!(sessions(), 4, "a request loaded a session");
}

/// With a batch wait, requests that arrive together run in one call, and
/// each client gets its own rows back.
#[test]
fn requests_arriving_together_run_as_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let addr = start(dir.path(), 16, Duration::from_secs(1));
    let before = CALLS.load(std::sync::atomic::Ordering::SeqCst);
    let answers: Vec<(usize, u16, String)> = std::thread::scope(|s| {
        let clients: Vec<_> = (1..=6)
            .map(|k| {
                s.spawn(move || {
                    let body = format!(r#"{{"texts": ["{}"]}}"#, vec!["a"; k].join(" "));
                    let (code, _, text) = send(addr, body.as_bytes());
                    (k, code, text)
                })
            })
            .collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    for (k, code, text) in &answers {
        assert_eq!(*code, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(v["embeddings"], serde_json::json!([[*k as f64]]), "{text}");
    }
    // Six requests sent at once: fewer calls than requests (one, unless a
    // client took over a second to connect).
    let calls = CALLS.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!((1..6).contains(&calls), "{calls} calls for 6 requests");
}

/// A request not answered in time gets 504 with a JSON error, and the model
/// thread skips a request whose client has given up instead of running it.
#[test]
fn requests_past_their_deadline_get_504_and_are_not_run() {
    let dir = tempfile::tempdir().unwrap();
    // 32 requests of 20 ms each against a 150 ms deadline.
    let addr = start_with_timeout(dir.path(), 64, Duration::ZERO, Duration::from_millis(150));
    let before = CALLS.load(std::sync::atomic::Ordering::SeqCst);
    let ok = br#"{"texts": ["a a"]}"#;
    let answers: Vec<(u16, String, String)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..32).map(|_| s.spawn(|| send(addr, ok))).collect();
        clients.into_iter().map(|c| c.join().unwrap()).collect()
    });
    let count = |code: u16| answers.iter().filter(|a| a.0 == code).count();
    assert_eq!(count(200) + count(504), answers.len(), "{answers:?}");
    assert!(count(504) > 0, "no request timed out: {answers:?}");
    let late = answers.iter().find(|a| a.0 == 504).unwrap();
    let v: serde_json::Value = serde_json::from_str(&late.2).unwrap();
    assert!(
        v["error"].as_str().unwrap().contains("no answer within"),
        "{}",
        late.2
    );
    // Wait for the model thread to drain what is left, then count its calls.
    std::thread::sleep(Duration::from_millis(800));
    let runs = CALLS.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        runs < answers.len(),
        "{runs} calls for {} requests",
        answers.len()
    );
    // And it answers in time when it is not overloaded.
    let (code, _, text) = send(addr, ok);
    assert_eq!(code, 200, "{text}");
}
