//! Ctrl-C as a user presses it: SIGINT to the running demo makes it finish the current optimizer
//! step, write a resumable checkpoint, say where and how to resume, and exit with status 130.

#![cfg(unix)]

mod common;
use common::{example, tmp};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn sigint_checkpoints_says_how_to_resume_and_exits_130() {
    let dir = tmp("sigint");
    let out_dir = dir.join("demo");
    let mut child = Command::new(example("finetune_multilingual"))
        .args(["--output-dir", out_dir.to_str().unwrap()])
        .args([
            "--eval-rows",
            "0",
            "--report-to",
            "none",
            "--progress-bar",
            "false",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the demo starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    // Interrupt after the first logged step.
    for line in lines.by_ref() {
        let line = line.expect("utf-8 output");
        let first_step = line.starts_with("{'loss'");
        seen.push(line);
        if first_step {
            break;
        }
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(status.success());
    seen.extend(lines.map_while(|l| l.ok()));
    let code = child.wait().expect("the demo exits").code();
    let text = seen.join("\n");
    assert_eq!(code, Some(130), "exit status after Ctrl-C:\n{text}");
    assert!(text.contains("--resume-from-checkpoint"), "{text}");
    assert!(!text.contains("adapter saved"), "{text}");
    let ckpt = std::fs::read_dir(&out_dir)
        .expect("output dir")
        .filter_map(|e| e.ok())
        .find(|e| e.file_name().to_string_lossy().starts_with("checkpoint-"))
        .expect("a checkpoint was written");
    assert!(ckpt.path().join("optimizer.safetensors").is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
