//! The load scenarios end to end: `handoff serve` and the FastAPI service
//! under the same open-loop HTTP load, in-process Poisson serving and
//! multi-stream on a tiny BERT; and the errors a user meets first.

mod common;

use common::{handoff, run_ok, write_tokenizer};

use handoff_runner::Status;

#[test]
fn http_server_and_multi_stream_scenarios_run_and_report() {
    // The FastAPI service runs in the baseline environment (pinned, PyPI).
    handoff_python::setup().expect("python baseline environment");
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 32, 2, 4, 7).unwrap();
    write_tokenizer(&bert);
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: serving\nmodels:\n  - id: tiny\n    source: {hf: bert}\n    text: {sentences: [w4 w5 w6, w7 w8, w9]}\n\
         backends: [ort, tract, python-onnxruntime]\nthreads: [1]\nbatch: [1]\ndims: {seq: [8]}\n\
         scenarios:\n  - single-stream\n\
         \x20 - {http: {qps: [10], peak_p99: 200ms, duration: 3s, min_queries: 30, backends: [ort, python-onnxruntime]}}\n\
         \x20 - {server: {qps: [50], duration: 1s, min_queries: 30, backends: [tract]}}\n\
         \x20 - {multi-stream: {streams: [2], duration: 300ms, backends: [tract]}}\n\
         backend_options: {ort: {denormals: flush}}\n\
         timeout: 60s\n\
         measure: {warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 300ms, target_ci: 0.2}\n",
    )
    .unwrap();
    let records = run_ok(dir.path(), "s.yaml", "out");
    // 3 single-stream + 2 backends x (20 QPS + peak) + server + multi-stream.
    assert_eq!(records.len(), 3 + 4 + 2, "{records:#?}");
    for r in &records {
        assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
    }
    for r in records
        .iter()
        .filter(|r| r.case.scenario.starts_with("http "))
    {
        // The served embedding of the first request matched the reference.
        assert!(r.parity.as_ref().is_some_and(|p| p.ok), "{}", r.case.id);
        let load = r.load.as_ref().unwrap();
        let server = load.server.as_deref().unwrap();
        if r.case.backend == "python-onnxruntime" {
            assert!(server.starts_with("FastAPI"), "{server}");
        } else {
            assert!(server.starts_with("handoff serve"), "{server}");
        }
        // Both servers got the suite's ORT settings (and started with them:
        // the FastAPI service checks that flushing took).
        assert!(server.ends_with(" (denormals: flush)"), "{server}");
        assert!(load.server_rss_mb.is_some_and(|mb| mb > 1.0));
        assert_eq!(r.samples_ms.len() as u64, load.completed);
        if r.case.id.ends_with("http@10qps") {
            // A tiny model at 10/s keeps up, and latency counts from the
            // scheduled arrival.
            assert!(!load.saturated, "{}: {load:?}", r.case.id);
            assert!(load.achieved_qps > 5.0 && load.achieved_qps < 20.0);
            assert!(r.latency_ms.as_ref().unwrap().p50 > 0.0);
        } else {
            assert_eq!(load.p99_bound_ms, Some(200.0));
            assert!(load.peak_qps.is_some(), "{}: {load:?}", r.case.id);
            assert!(!load.levels.is_empty());
        }
    }
    // The two servers at 10 QPS were loaded in alternating blocks: three
    // blocks of 10 queries each, A B / B A / A B, paired in comparisons.jsonl.
    let fixed: Vec<_> = records
        .iter()
        .filter(|r| r.case.id.ends_with("http@10qps"))
        .collect();
    assert_eq!(fixed.len(), 2);
    let (a, b) = (
        fixed[0].rounds.as_ref().expect("alternated"),
        fixed[1].rounds.as_ref().expect("alternated"),
    );
    assert!(
        a.group.starts_with("http-") && a.group == b.group,
        "{a:?} {b:?}"
    );
    for info in [a, b] {
        assert_eq!(info.block_medians_ms.len(), 3, "{info:?}");
        assert!(info.block_medians_ms.iter().all(Option::is_some));
        assert_eq!(info.block_runs.iter().sum::<usize>(), 30);
    }
    for round in 0..3 {
        assert_ne!(a.slots[round], b.slots[round]);
    }
    assert_eq!(
        (a.slots[0], a.slots[1], a.slots[2]),
        (a.slots[0], 1 - a.slots[0], a.slots[0])
    );
    let comparisons = handoff_runner::read_comparisons(&dir.path().join("out/comparisons.jsonl"));
    assert!(
        comparisons.iter().any(|c| c.group == a.group
            && c.b.contains("/python-onnxruntime/")
            && c.b.ends_with("/http@10qps")),
        "{comparisons:#?}"
    );
    let server = records
        .iter()
        .find(|r| r.case.id.ends_with("/server@50qps"))
        .unwrap();
    let load = server.load.as_ref().unwrap();
    assert!(load.server.is_none() && !load.saturated && load.completed >= 30);
    let multi = records
        .iter()
        .find(|r| r.case.id.ends_with("/multi-stream@2"))
        .unwrap();
    let load = multi.load.as_ref().unwrap();
    assert_eq!((load.streams, load.per_stream_p99_ms.len()), (Some(2), 2));
    let summary = std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap();
    assert!(
        summary.contains("## Under load")
            && summary.contains("## Hand-off gain: serving (handoff serve vs FastAPI)")
            && summary.contains("| tiny | onnxruntime | 1 | 1 | 10 QPS |"),
        "{summary}"
    );
    // The two peak searches took turns, step by step; their steps are at
    // rates of their own, so nothing is paired.
    for r in records.iter().filter(|r| r.case.id.contains("/http@peak")) {
        let load = r.load.as_ref().unwrap();
        assert!(load.alternated && r.rounds.is_none(), "{}", r.case.id);
    }
    // The peak searches in a sentence: both peaks, how they were searched,
    // and no claimed difference (a search has no interval).
    assert!(
        summary.contains(
            "`tiny` (1 thread, batch 1), highest rate with p99 <= 200 ms on this machine: "
        ) && summary.contains("(one search each, no interval; searched in turns)"),
        "{summary}"
    );
    assert!(summary.contains("searched in turns"), "{summary}");
    // The fixed-rate row carries the paired ratio of the alternated servers.
    let row = summary
        .lines()
        .find(|l| l.starts_with("| tiny | onnxruntime | 1 | 1 | 10 QPS |"))
        .unwrap();
    assert!(
        summary.contains("FastAPI / handoff p50 (paired, 95% CI)")
            && (row.contains("x [") || row.contains("no measurable difference")),
        "{row}"
    );
    let html = std::fs::read_to_string(dir.path().join("out/report.html")).unwrap();
    assert!(html.contains("<h2>Under load</h2>"));
}

/// The hand-off served with its int8 build: an `http` scenario that lists a
/// precision variant loads it too, beside the fp32 servers, and the serving
/// table puts it next to FastAPI with its accuracy gate. A variant the
/// model does not build is refused where the scenario names it.
#[test]
fn a_load_scenario_serves_the_variants_it_lists() {
    handoff_python::setup().expect("python baseline environment");
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 32, 2, 4, 7).unwrap();
    write_tokenizer(&bert);
    let suite = |builds: &str, variant: &str| {
        format!(
            "name: serving\nmodels:\n  - id: tiny\n    source: {{hf: bert}}\n    text: {{sentences: [w4 w5 w6, w7 w8, w9]}}\n    variants: [{builds}]\n    min_cosine: 0.9\n\
             \x20   scenarios:\n      - single-stream\n\
             \x20     - {{http: {{qps: [20], duration: 1s, min_queries: 10, variants: [{variant}]}}}}\n\
             backends: [ort, python-onnxruntime]\nthreads: [1]\nbatch: [1]\ndims: {{seq: [8]}}\ntimeout: 60s\n\
             measure: {{warmup: 10ms, min_iterations: 5, min_time: 20ms, max_time: 200ms, target_ci: 0.2}}\n"
        )
    };
    // Not built, or made by its runtime at load (no file a server runs).
    std::fs::write(
        dir.path().join("bad.yaml"),
        suite("fp32, int8-dynamic, torch-bf16", "fp16, torch-bf16"),
    )
    .unwrap();
    let o = common::handoff(&["validate", "bad.yaml"], dir.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(
            "models[0].scenarios: a scenario loads variant `fp16`, which this model does not build"
        ) && err.contains(
            "a scenario loads variant `torch-bf16`, which python-torch makes at load: no server runs it"
        ),
        "{err}"
    );
    std::fs::write(
        dir.path().join("s.yaml"),
        suite("fp32, int8-dynamic", "int8-dynamic"),
    )
    .unwrap();
    let records = run_ok(dir.path(), "s.yaml", "out");
    let http: Vec<&str> = records
        .iter()
        .filter(|r| r.case.scenario.starts_with("http "))
        .map(|r| r.case.id.as_str())
        .collect();
    assert_eq!(
        http,
        [
            "tiny/ort/cpu/t1/b1/seq=8/http@20qps",
            "tiny/python-onnxruntime/cpu/t1/b1/seq=8/http@20qps",
            "tiny@int8-dynamic/ort/cpu/t1/b1/seq=8/http@20qps",
            "tiny@int8-dynamic/python-onnxruntime/cpu/t1/b1/seq=8/http@20qps"
        ]
    );
    for r in records
        .iter()
        .filter(|r| r.case.scenario.starts_with("http "))
    {
        assert_eq!(r.status, Status::Ok, "{}: {:?}", r.case.id, r.reason);
    }
    let summary = std::fs::read_to_string(dir.path().join("out/summary.md")).unwrap();
    let row = |fastapi: &str| {
        summary.lines().any(|l| {
            l.starts_with("| tiny@int8-dynamic (cos ")
                && l.contains(&format!(" vs fp32, passes) | {fastapi} | 1 | 1 | 20 QPS |"))
        })
    };
    // handoff serve on the int8 file beside FastAPI on the fp32 file, and
    // beside FastAPI on the int8 file, said as such.
    assert!(
        row("onnxruntime") && row("onnxruntime (int8-dynamic)"),
        "{summary}"
    );
}

#[test]
fn serve_refuses_a_port_in_use_and_remote_hosts() {
    let dir = tempfile::tempdir().unwrap();
    let bert = dir.path().join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 32, 1, 4, 7).unwrap();
    write_tokenizer(&bert);
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    // The model is not even read: the port is checked first.
    let out = handoff(
        &["serve", "missing.onnx", "--hf-dir", "bert", "--port", &port],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("port {port} on 127.0.0.1 is already in use")),
        "{err}"
    );
    let out = handoff(&["serve", "m.onnx", "--host", "0.0.0.0"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not a loopback address"), "{err}");
    // Settings are checked as a suite's would be, before anything loads.
    let out = handoff(
        &[
            "serve",
            "m.onnx",
            "--backend-options",
            r#"{"denormal": "flush"}"#,
        ],
        dir.path(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(r#"--backend-options {"denormal": "flush"}"#)
            && err.contains("unknown field `denormal`"),
        "{err}"
    );
}

#[test]
fn an_http_scenario_needs_a_text_model_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: t\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\n\
         backends: [ort]\nscenarios:\n  - {http: {qps: [10]}}\n  - {server: {}}\n  - serverless\n",
    )
    .unwrap();
    let out = handoff(&["validate", "s.yaml"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    // Parse errors come first and stop there: the unknown name, located.
    assert!(
        err.contains("s.yaml:9:5: scenarios[2]: unknown variant `serverless`"),
        "{err}"
    );
    std::fs::write(
        dir.path().join("s.yaml"),
        "name: t\nmodels:\n  - id: mlp\n    source: {synthetic: {kind: mlp, width: 8, depth: 1}}\n\
         backends: [ort]\nscenarios:\n  - {http: {qps: [10, -1]}}\n  - {server: {}}\n",
    )
    .unwrap();
    let out = handoff(&["validate", "s.yaml"], dir.path());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for want in [
        "scenarios[0].http.qps[1]: must be a rate above 0",
        "scenarios[1].server: give `qps: [..]`",
        "scenarios: an `http` scenario sends sentences, so it needs a text model",
    ] {
        assert!(err.contains(want), "{want}\n{err}");
    }
}

/// A tiny BERT in `dir/bert` (with its tokenizer) and its ONNX conversion
/// `dir/m.onnx`.
fn tiny_converted_bert(
    dir: &std::path::Path,
    layers: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let bert = dir.join("bert");
    handoff_convert::bert::write_tiny_bert(&bert, 32, layers, 4, 7).unwrap();
    write_tokenizer(&bert);
    let model = dir.join("m.onnx");
    handoff_convert::bert::convert(&handoff_convert::bert::HfDir::new(&bert), &model).unwrap();
    (bert, model)
}

/// The address a server prints after `prefix` once it is ready.
fn ready_address(child: &mut std::process::Child, prefix: &str) -> String {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    line.trim()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("no ready line: {line:?}"))
        .to_owned()
}

/// One POST /embed on `stream`, read to the end of its body.
fn post_embed(stream: &mut std::net::TcpStream, addr: &str) -> std::time::Duration {
    use std::io::{Read, Write};
    let body = br#"{"texts": ["w4 w5 w6"]}"#;
    let start = std::time::Instant::now();
    let mut req = format!(
        "POST /embed HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    stream.write_all(&req).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed mid-response");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if got.len() >= end + 4 + len {
                return start.elapsed();
            }
        }
    }
}

#[test]
fn the_fastapi_service_answers_keep_alive_requests_as_fast_as_fresh_ones() {
    // Keep-alive is what every HTTP client pool and handoff's load generator
    // use; a response that stalls on Nagle + delayed ACK there costs ~40 ms
    // that no team's deployment pays.
    handoff_python::setup().expect("python baseline environment");
    let dir = tempfile::tempdir().unwrap();
    let (bert, model) = tiny_converted_bert(dir.path(), 1);
    let mut child = handoff_python::fastapi_command(
        &model,
        &bert.join("tokenizer.json"),
        1,
        8,
        8,
        &serde_json::Value::Null,
    )
    .unwrap()
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    let addr = ready_address(&mut child, "listening on http://");
    let connect = || {
        let s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_nodelay(true).unwrap();
        s
    };
    let median = |mut v: Vec<std::time::Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut kept = connect();
    post_embed(&mut kept, &addr);
    let keep_alive = median((0..15).map(|_| post_embed(&mut kept, &addr)).collect());
    let fresh = median((0..15).map(|_| post_embed(&mut connect(), &addr)).collect());
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        keep_alive <= fresh + std::time::Duration::from_millis(10),
        "keep-alive median {keep_alive:?} vs a new connection per request {fresh:?}"
    );
}

/// One request on a new connection: the status code and the body.
fn request(addr: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let mut req = format!(
        "POST /embed HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    // A server that refuses a body may close before reading all of it.
    let _ = s.write_all(&req);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, text)
}

/// A `/proc/PID/status` memory line (`VmRSS`, `VmHWM`: the peak), MB.
fn status_mb(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap()
        / 1024.0
}

fn rss_mb(pid: u32) -> f64 {
    status_mb(pid, "VmRSS")
}

#[test]
fn serve_soak_overload_and_hostile_bodies_then_serves_and_stops_cleanly_on_sigterm() {
    // Short form of the overload soak: as many requests as eight clients
    // can send for three seconds against a queue of four, interleaved with
    // oversized, overlong and broken bodies. `HANDOFF_SOAK_SECS=60` is the
    // full run (its figures are in docs/python-and-serving.md).
    let secs: u64 = std::env::var("HANDOFF_SOAK_SECS")
        .ok()
        .map(|v| v.parse().expect("HANDOFF_SOAK_SECS: whole seconds"))
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    tiny_converted_bert(dir.path(), 2);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_handoff"))
        .args(["serve", "m.onnx", "--hf-dir", "bert", "--backend", "tract"])
        .args(["--seq", "16", "--port", "0", "--queue", "4"])
        .args(["--max-body-bytes", "65536", "--max-text-bytes", "1024"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let addr = ready_address(&mut child, handoff_runner::http_case::READY_PREFIX);
    let rss_before = rss_mb(child.id());
    let big = format!(r#"{{"texts": ["{}"]}}"#, "w4 ".repeat(40_000));
    let long = format!(r#"{{"texts": ["{}"]}}"#, "w5".repeat(1000));
    let bodies: [(&[u8], &[u16]); 5] = [
        (br#"{"texts": ["w4 w5 w6"]}"#, &[200, 503]),
        (big.as_bytes(), &[413]),
        (long.as_bytes(), &[422]),
        (br#"{"texts": ["#, &[400]),
        (br#"{"texts": [1, 2]}"#, &[422]),
    ];
    let started = std::time::Instant::now();
    let deadline = started + std::time::Duration::from_secs(secs);
    let answers: Vec<(usize, u16, String)> = std::thread::scope(|s| {
        let clients: Vec<_> = (0..8)
            .map(|t| {
                let (addr, bodies) = (&addr, &bodies);
                s.spawn(move || {
                    let mut got = Vec::new();
                    let mut i = t;
                    while std::time::Instant::now() < deadline {
                        // Mostly good requests, every fifth a bad one.
                        let k = if i % 5 == 0 { 1 + (i / 5) % 4 } else { 0 };
                        let (code, text) = request(addr, bodies[k].0);
                        got.push((k, code, text));
                        i += 1;
                    }
                    got
                })
            })
            .collect();
        clients
            .into_iter()
            .flat_map(|c| c.join().unwrap())
            .collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let rss_peak = status_mb(child.id(), "VmHWM");
    for (k, code, text) in &answers {
        assert!(bodies[*k].1.contains(code), "body {k}: {text}");
    }
    let served = answers.iter().filter(|a| a.1 == 200).count();
    assert!(served > 0, "no request was served");
    assert_eq!(
        child.try_wait().unwrap(),
        None,
        "the server died under load"
    );
    let rss_after = rss_mb(child.id());
    assert!(
        rss_after < rss_before + 200.0,
        "RSS grew from {rss_before:.0} MB to {rss_after:.0} MB"
    );
    // Right after: it answers as before.
    let (code, text) = request(&addr, bodies[0].0);
    assert_eq!(code, 200, "{text}");
    // SIGTERM: stops accepting, finishes what is in flight, exits 0.
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "still running 10 s after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let good = answers.iter().filter(|a| a.0 == 0).count();
    eprintln!(
        "{} requests in {elapsed:.1} s ({good} valid, {} bad bodies, all rejected): {served} served ({:.0}/s), {} shed with 503 ({:.0}/s): valid requests offered at {:.1}x the served rate; RSS {rss_before:.0} MB before, {rss_after:.0} MB after, peak {rss_peak:.0} MB",
        answers.len(),
        answers.len() - good,
        served as f64 / elapsed,
        answers.iter().filter(|a| a.1 == 503).count(),
        answers.iter().filter(|a| a.1 == 503).count() as f64 / elapsed,
        good as f64 / served.max(1) as f64,
    );
}
