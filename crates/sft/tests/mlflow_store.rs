//! MLflow file store layout (reference §9) and the REST client against a loopback server.
//! scripts/fixtures/sft/read_mlruns.py reads a store written here back with the mlflow package
//! (set SFT_MLRUNS_DIR to keep the store).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;

use gptoss_sft::mlflow::{FileStore, MlflowClient, MlflowRun, RunStatus};

fn store_dir() -> (Option<tempfile::TempDir>, PathBuf) {
    match std::env::var_os("SFT_MLRUNS_DIR") {
        Some(d) => (None, PathBuf::from(d)),
        None => {
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("mlruns");
            (Some(t), p)
        }
    }
}

#[test]
fn file_store_layout() {
    let (_keep, root) = store_dir();
    let client = MlflowClient::File(FileStore::new(&root).unwrap());
    let mut run = MlflowRun::start(client, "gpt-oss-sft", "tiny-run").unwrap();
    run.log_params(&[
        ("learning_rate".into(), "0.0002".into()),
        ("lr_scheduler_type".into(), "cosine_with_min_lr".into()),
    ])
    .unwrap();
    for step in 1..=3 {
        run.log_metrics(
            step,
            &[
                ("loss".into(), 3.0 - step as f64 * 0.5),
                ("learning_rate".into(), 2e-4),
                ("train/grad_norm".into(), 0.25),
            ],
        )
        .unwrap();
    }
    run.set_tags(&[("stage".into(), "test".into())]).unwrap();
    // Params are immutable.
    assert!(run
        .log_params(&[("learning_rate".into(), "0.1".into())])
        .is_err());
    run.finish(RunStatus::Finished).unwrap();

    let root = std::fs::canonicalize(&root).unwrap();
    assert!(root.join(".trash").is_dir());
    let default = std::fs::read_to_string(root.join("0/meta.yaml")).unwrap();
    assert!(default.contains("name: Default"), "{default}");
    assert!(default.contains("experiment_id: '0'"), "{default}");
    let exp_dir = root.join(&run.experiment_id);
    let exp = std::fs::read_to_string(exp_dir.join("meta.yaml")).unwrap();
    assert!(exp.contains("name: gpt-oss-sft"));
    assert!(exp.contains("lifecycle_stage: active"));
    let run_dir = exp_dir.join(&run.run_id);
    let meta = std::fs::read_to_string(run_dir.join("meta.yaml")).unwrap();
    assert!(meta.contains(&format!("run_id: {}", run.run_id)), "{meta}");
    assert!(meta.contains("status: 3"), "{meta}");
    assert!(meta.contains("source_type: 4"), "{meta}");
    assert!(
        meta.contains(&format!("experiment_id: '{}'", run.experiment_id)),
        "{meta}"
    );
    assert!(!meta.contains("end_time: null"), "{meta}");
    let loss = std::fs::read_to_string(run_dir.join("metrics/loss")).unwrap();
    let lines: Vec<Vec<&str>> = loss.lines().map(|l| l.split(' ').collect()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0][1..], ["2.5", "1"]);
    assert_eq!(lines[2][1..], ["1.5", "3"]);
    assert!(lines[0][0].parse::<u64>().unwrap() > 1_600_000_000_000);
    assert!(run_dir.join("metrics/train/grad_norm").is_file());
    assert_eq!(
        std::fs::read_to_string(run_dir.join("params/learning_rate")).unwrap(),
        "0.0002"
    );
    assert_eq!(
        std::fs::read_to_string(run_dir.join("tags/mlflow.runName")).unwrap(),
        "tiny-run"
    );
    // A second run reuses the experiment.
    let client = MlflowClient::File(FileStore::new(&root).unwrap());
    let mut run2 = MlflowRun::start(client, "gpt-oss-sft", "second").unwrap();
    assert_eq!(run2.experiment_id, run.experiment_id);
    run2.log_metrics(1, &[("loss".into(), 9.0)]).unwrap();
    run2.finish(RunStatus::Killed).unwrap();
    let meta = std::fs::read_to_string(exp_dir.join(&run2.run_id).join("meta.yaml")).unwrap();
    assert!(meta.contains("status: 5"), "{meta}");
}

/// One recorded request: method, path (with query), body.
type Seen = (String, String, String);

/// Serves `n` requests on a loopback port (one per connection, `Connection: close`), answering
/// like an MLflow server; returns the URL and a handle yielding what it saw.
fn fake_server(n: usize) -> (String, std::thread::JoinHandle<Vec<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let mut seen = Vec::new();
        for stream in listener.incoming().take(n) {
            let mut stream = stream.unwrap();
            stream
                .set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h == "\r\n" || h.is_empty() {
                    break;
                }
                if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            let mut parts = first.split_whitespace();
            let method = parts.next().unwrap().to_string();
            let path = parts.next().unwrap().to_string();
            let (status, resp) = if path.contains("experiments/get-by-name") {
                (
                    404,
                    r#"{"error_code":"RESOURCE_DOES_NOT_EXIST","message":"no"}"#.to_string(),
                )
            } else if path.ends_with("experiments/create") {
                (200, r#"{"experiment_id":"7"}"#.to_string())
            } else if path.ends_with("runs/create") {
                (
                    200,
                    r#"{"run":{"info":{"run_id":"0123456789abcdef0123456789abcdef"},"data":{}}}"#
                        .to_string(),
                )
            } else {
                (200, "{}".to_string())
            };
            let reply = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{resp}",
                resp.len()
            );
            stream.write_all(reply.as_bytes()).unwrap();
            seen.push((method, path, String::from_utf8(body).unwrap()));
        }
        seen
    });
    (url, handle)
}

#[test]
fn rest_client_protocol() {
    // get-by-name (404), experiments/create, runs/create, log-batch ×2, runs/update
    let (url, server) = fake_server(6);
    let client = MlflowClient::from_uri(&url).unwrap();
    let mut run = MlflowRun::start(client, "exp a", "rest-run").unwrap();
    assert_eq!(run.experiment_id, "7");
    assert_eq!(run.run_id, "0123456789abcdef0123456789abcdef");
    run.log_params(&[("learning_rate".into(), "0.0002".into())])
        .unwrap();
    run.log_metrics(5, &[("loss".into(), 1.25)]).unwrap();
    run.finish(RunStatus::Failed).unwrap();
    let seen = server.join().unwrap();
    assert_eq!(seen.len(), 6);
    assert_eq!(seen[0].0, "GET");
    assert!(
        seen[0]
            .1
            .starts_with("/api/2.0/mlflow/experiments/get-by-name?experiment_name=exp"),
        "{}",
        seen[0].1
    );
    let body = |i: usize| -> serde_json::Value { serde_json::from_str(&seen[i].2).unwrap() };
    assert_eq!(seen[1].1, "/api/2.0/mlflow/experiments/create");
    assert_eq!(body(1)["name"], "exp a");
    assert_eq!(seen[2].1, "/api/2.0/mlflow/runs/create");
    assert_eq!(body(2)["experiment_id"], "7");
    assert_eq!(body(2)["run_name"], "rest-run");
    assert!(body(2)["tags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["key"] == "mlflow.runName" && t["value"] == "rest-run"));
    assert_eq!(seen[3].1, "/api/2.0/mlflow/runs/log-batch");
    assert_eq!(body(3)["params"][0]["key"], "learning_rate");
    let m = &body(4)["metrics"][0];
    assert_eq!(
        (m["key"].as_str(), m["value"].as_f64(), m["step"].as_i64()),
        (Some("loss"), Some(1.25), Some(5))
    );
    assert_eq!(seen[5].1, "/api/2.0/mlflow/runs/update");
    assert_eq!(body(5)["status"], "FAILED");
    assert!(body(5)["end_time"].as_u64().unwrap() > 0);
}

#[test]
fn file_store_artifacts_are_copied_under_the_run() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("mlruns");
    let client = MlflowClient::File(FileStore::new(&root).unwrap());
    let mut run = MlflowRun::start(client, "artifacts", "a").unwrap();
    let src = t.path().join("eval");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("eval.json"), b"{}").unwrap();
    std::fs::write(src.join("sub/x.md"), b"# x").unwrap();
    let single = t.path().join("loss_curve.png");
    std::fs::write(&single, b"png").unwrap();
    run.log_artifacts(&src, "").unwrap();
    run.log_artifacts(&single, "plots").unwrap();
    run.finish(RunStatus::Finished).unwrap();
    let art = root
        .join(&run.experiment_id)
        .join(&run.run_id)
        .join("artifacts");
    assert_eq!(std::fs::read(art.join("eval/eval.json")).unwrap(), b"{}");
    assert_eq!(std::fs::read(art.join("eval/sub/x.md")).unwrap(), b"# x");
    assert_eq!(
        std::fs::read(art.join("plots/loss_curve.png")).unwrap(),
        b"png"
    );
}
