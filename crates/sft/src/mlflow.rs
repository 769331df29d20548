//! A minimal MLflow tracking client: the local `mlruns/` file store exactly as mlflow-skinny
//! 3.17.2 lays it out (reference §9), or the REST API (`/api/2.0/mlflow/...`) when
//! `MLFLOW_TRACKING_URI` is `http(s)://`.
//!
//! File store (view with `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri file:///abs/mlruns`):
//! ```text
//! mlruns/.trash/
//! mlruns/0/meta.yaml                    the Default experiment
//! mlruns/<exp>/meta.yaml                artifact_location, creation_time, experiment_id, …, name
//! mlruns/<exp>/<run_id>/meta.yaml       run info: status 1 RUNNING → 3 FINISHED / 4 FAILED / 5 KILLED
//! mlruns/<exp>/<run_id>/metrics/<key>   "<timestamp_ms> <value> <step>\n" per point
//! mlruns/<exp>/<run_id>/params/<key>    value (no newline)
//! mlruns/<exp>/<run_id>/tags/<key>      value (no newline); mlflow.runName, mlflow.user, …
//! mlruns/<exp>/<run_id>/artifacts/
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::atomic;
use crate::error::{Result, SftError};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Run status (MLflow's `RunStatus` enum values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    /// 1
    Running,
    /// 3
    Finished,
    /// 4
    Failed,
    /// 5
    Killed,
}

impl RunStatus {
    /// The integer the file store writes.
    pub fn code(self) -> u8 {
        match self {
            RunStatus::Running => 1,
            RunStatus::Finished => 3,
            RunStatus::Failed => 4,
            RunStatus::Killed => 5,
        }
    }

    /// The name the REST API uses.
    pub fn name(self) -> &'static str {
        match self {
            RunStatus::Running => "RUNNING",
            RunStatus::Finished => "FINISHED",
            RunStatus::Failed => "FAILED",
            RunStatus::Killed => "KILLED",
        }
    }
}

/// One metric point.
#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    /// Metric key, e.g. `loss` or `train/loss`.
    pub key: String,
    /// Value.
    pub value: f64,
    /// Milliseconds since the epoch.
    pub timestamp_ms: u64,
    /// Global step.
    pub step: i64,
}

/// MLflow key rules: non-empty, ≤ 250 chars, alphanumerics, `_ - . /` and spaces, no `..`
/// path segments, not absolute.
pub fn validate_key(key: &str) -> Result<()> {
    let ok_chars = key
        .chars()
        .all(|c| c.is_alphanumeric() || "_-./ ".contains(c));
    let bad_path = key.starts_with('/')
        || key
            .split('/')
            .any(|s| s == ".." || s == "." || s.is_empty());
    if key.is_empty() || key.len() > 250 || !ok_chars || bad_path {
        return Err(SftError::Mlflow(format!(
            "invalid key `{key}` (alphanumerics, _ - . / and spaces, at most 250 chars)"
        )));
    }
    Ok(())
}

/// Where runs are recorded.
pub enum MlflowClient {
    /// A local `mlruns/` directory.
    File(FileStore),
    /// A tracking server.
    Rest(RestClient),
}

impl MlflowClient {
    /// From `MLFLOW_TRACKING_URI`: `http(s)://…` → REST; `file:///abs/dir`, `file:rel/dir` or a
    /// plain path → that file store; unset → `default_dir` (e.g. `./mlruns`).
    pub fn from_env(default_dir: &Path) -> Result<Self> {
        match std::env::var("MLFLOW_TRACKING_URI") {
            Ok(uri) if !uri.trim().is_empty() => Self::from_uri(uri.trim()),
            _ => Ok(MlflowClient::File(FileStore::new(default_dir)?)),
        }
    }

    /// From a tracking URI (see [`MlflowClient::from_env`]).
    pub fn from_uri(uri: &str) -> Result<Self> {
        if uri.starts_with("http://") || uri.starts_with("https://") {
            Ok(MlflowClient::Rest(RestClient::new(uri)?))
        } else if let Some(path) = uri
            .strip_prefix("file://")
            .or_else(|| uri.strip_prefix("file:"))
        {
            Ok(MlflowClient::File(FileStore::new(Path::new(path))?))
        } else if uri.contains("://") || uri.starts_with("sqlite:") || uri.starts_with("databricks")
        {
            Err(SftError::Mlflow(format!(
                "unsupported tracking URI `{uri}` (use http(s)://, file:// or a directory)"
            )))
        } else {
            Ok(MlflowClient::File(FileStore::new(Path::new(uri))?))
        }
    }

    /// A human-readable location (directory or server URL).
    pub fn location(&self) -> String {
        match self {
            MlflowClient::File(f) => f.root().display().to_string(),
            MlflowClient::Rest(r) => r.base_url.clone(),
        }
    }

    /// The id of experiment `name`, created if missing.
    pub fn get_or_create_experiment(&self, name: &str) -> Result<String> {
        match self {
            MlflowClient::File(f) => f.get_or_create_experiment(name),
            MlflowClient::Rest(r) => r.get_or_create_experiment(name),
        }
    }

    /// Creates a RUNNING run; `tags` always gain `mlflow.runName`.
    pub fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        start_time_ms: u64,
        tags: &[(String, String)],
    ) -> Result<String> {
        let mut all = vec![("mlflow.runName".to_string(), run_name.to_string())];
        all.extend(tags.iter().filter(|(k, _)| k != "mlflow.runName").cloned());
        match self {
            MlflowClient::File(f) => f.create_run(experiment_id, run_name, start_time_ms, &all),
            MlflowClient::Rest(r) => r.create_run(experiment_id, run_name, start_time_ms, &all),
        }
    }

    /// Logs params, metrics and tags of `run_id`.
    pub fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<()> {
        match self {
            MlflowClient::File(f) => f.log_batch(run_id, metrics, params, tags),
            MlflowClient::Rest(r) => r.log_batch(run_id, metrics, params, tags),
        }
    }

    /// Sets the final status and end time.
    pub fn set_terminated(&self, run_id: &str, status: RunStatus, end_time_ms: u64) -> Result<()> {
        match self {
            MlflowClient::File(f) => f.set_terminated(run_id, status, end_time_ms),
            MlflowClient::Rest(r) => r.set_terminated(run_id, status, end_time_ms),
        }
    }
}

/// An open run: the handle the trainer logs through.
pub struct MlflowRun {
    client: MlflowClient,
    /// Experiment id.
    pub experiment_id: String,
    /// 32-hex run id.
    pub run_id: String,
    /// Run name (`mlflow.runName`).
    pub run_name: String,
    finished: bool,
}

impl MlflowRun {
    /// Opens a run in experiment `experiment` (created if missing) with `tags` (plus
    /// `mlflow.runName`, `mlflow.user` and `mlflow.source.name`).
    pub fn start(client: MlflowClient, experiment: &str, run_name: &str) -> Result<Self> {
        let experiment_id = client.get_or_create_experiment(experiment)?;
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        let source = std::env::args().next().unwrap_or_default();
        let tags = vec![
            ("mlflow.user".to_string(), user),
            ("mlflow.source.name".to_string(), source),
            ("mlflow.source.type".to_string(), "LOCAL".to_string()),
        ];
        let run_id = client.create_run(&experiment_id, run_name, now_ms(), &tags)?;
        Ok(Self {
            client,
            experiment_id,
            run_id,
            run_name: run_name.to_string(),
            finished: false,
        })
    }

    /// The client (for its [`MlflowClient::location`]).
    pub fn client(&self) -> &MlflowClient {
        &self.client
    }

    /// Logs params (in chunks of 100, the REST limit).
    pub fn log_params(&self, params: &[(String, String)]) -> Result<()> {
        for chunk in params.chunks(100) {
            self.client.log_batch(&self.run_id, &[], chunk, &[])?;
        }
        Ok(())
    }

    /// Logs `(key, value)` metrics at `step`, timestamped now.
    pub fn log_metrics(&self, step: i64, values: &[(String, f64)]) -> Result<()> {
        let ts = now_ms();
        let metrics: Vec<Metric> = values
            .iter()
            .map(|(k, v)| Metric {
                key: k.clone(),
                value: *v,
                timestamp_ms: ts,
                step,
            })
            .collect();
        for chunk in metrics.chunks(1000) {
            self.client.log_batch(&self.run_id, chunk, &[], &[])?;
        }
        Ok(())
    }

    /// Logs the file or directory `local` (recursively) as artifacts under `artifact_path`
    /// (`""` = the root): copied into the file store's `artifacts/`, or uploaded through the
    /// tracking server's artifact proxy (`mlflow server` serves artifacts by default).
    pub fn log_artifacts(&self, local: &Path, artifact_path: &str) -> Result<()> {
        let files = artifact_files(local, artifact_path)?;
        for (src, rel) in files {
            match &self.client {
                MlflowClient::File(f) => {
                    f.put_artifact(&self.experiment_id, &self.run_id, &src, &rel)?
                }
                MlflowClient::Rest(r) => {
                    r.put_artifact(&self.experiment_id, &self.run_id, &src, &rel)?
                }
            }
        }
        Ok(())
    }

    /// Sets tags.
    pub fn set_tags(&self, tags: &[(String, String)]) -> Result<()> {
        self.client.log_batch(&self.run_id, &[], &[], tags)
    }

    /// Ends the run with `status` (FINISHED, FAILED or KILLED).
    pub fn finish(&mut self, status: RunStatus) -> Result<()> {
        self.client.set_terminated(&self.run_id, status, now_ms())?;
        self.finished = true;
        Ok(())
    }

    /// Whether [`MlflowRun::finish`] was called.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

impl Drop for MlflowRun {
    /// A run dropped without [`MlflowRun::finish`] (an error or panic unwound past it) is
    /// marked FAILED, best effort.
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .client
                .set_terminated(&self.run_id, RunStatus::Failed, now_ms());
        }
    }
}

/// Every file under `local` (itself if a file) with its artifact path (`artifact_path/name/...`).
fn artifact_files(local: &Path, artifact_path: &str) -> Result<Vec<(PathBuf, String)>> {
    let join = |a: &str, b: &str| {
        if a.is_empty() {
            b.to_string()
        } else {
            format!("{a}/{b}")
        }
    };
    let name = local
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rel = join(artifact_path, &name);
    if local.is_file() {
        return Ok(vec![(local.to_path_buf(), rel)]);
    }
    let mut out = Vec::new();
    let entries = std::fs::read_dir(local).map_err(|e| SftError::io(local, e))?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for p in paths {
        out.extend(artifact_files(&p, &rel)?);
    }
    Ok(out)
}

/// A 32-hex run id.
pub fn new_run_id() -> String {
    let mut rng = rand::rng();
    (0..16)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

// ---------------------------------------------------------------- file store

/// `<exp>/meta.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExperimentMeta {
    /// `file:///abs/mlruns/<id>`.
    pub artifact_location: String,
    /// ms.
    pub creation_time: u64,
    /// Quoted string id.
    pub experiment_id: String,
    /// ms.
    pub last_update_time: u64,
    /// `active`.
    pub lifecycle_stage: String,
    /// Name.
    pub name: String,
}

/// `<exp>/<run>/meta.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMeta {
    /// `file:///…/artifacts`.
    pub artifact_uri: String,
    /// ms, `null` while running.
    pub end_time: Option<u64>,
    /// `''`.
    pub entry_point_name: String,
    /// Parent experiment id.
    pub experiment_id: String,
    /// `active`.
    pub lifecycle_stage: String,
    /// 32 hex.
    pub run_id: String,
    /// Run name.
    pub run_name: String,
    /// Same as `run_id` (legacy field MLflow still writes).
    pub run_uuid: String,
    /// `''`.
    pub source_name: String,
    /// 4 = LOCAL.
    pub source_type: u8,
    /// `''`.
    pub source_version: String,
    /// ms.
    pub start_time: u64,
    /// 1 RUNNING, 3 FINISHED, 4 FAILED, 5 KILLED.
    pub status: u8,
    /// Always empty (tags live in `tags/`).
    pub tags: Vec<String>,
    /// User.
    pub user_id: String,
}

/// A local `mlruns/` directory.
pub struct FileStore {
    root: PathBuf,
}

fn file_uri(p: &Path) -> String {
    format!("file://{}", p.display())
}

fn read_yaml<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| SftError::io(path, e))?;
    serde_yaml_ng::from_str(&text).map_err(|e| SftError::format(path, e.to_string()))
}

fn write_yaml<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let text = serde_yaml_ng::to_string(v).map_err(|e| SftError::format(path, e.to_string()))?;
    atomic::write_bytes(path, text.as_bytes())
}

fn mkdirs(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| SftError::io(p, e))
}

impl FileStore {
    /// Opens (creating) the store at `root` (made absolute), with `.trash/` and the Default
    /// experiment `0`.
    pub fn new(root: &Path) -> Result<Self> {
        mkdirs(root)?;
        let root = std::fs::canonicalize(root).map_err(|e| SftError::io(root, e))?;
        let store = Self { root };
        mkdirs(&store.root.join(".trash"))?;
        if !store.root.join("0/meta.yaml").exists() {
            store.write_experiment("0", "Default")?;
        }
        Ok(store)
    }

    /// The absolute store directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn write_experiment(&self, id: &str, name: &str) -> Result<()> {
        let dir = self.root.join(id);
        mkdirs(&dir)?;
        let now = now_ms();
        write_yaml(
            &dir.join("meta.yaml"),
            &ExperimentMeta {
                artifact_location: file_uri(&dir),
                creation_time: now,
                experiment_id: id.to_string(),
                last_update_time: now,
                lifecycle_stage: "active".into(),
                name: name.to_string(),
            },
        )
    }

    fn experiments(&self) -> Result<Vec<ExperimentMeta>> {
        let mut out = Vec::new();
        let entries = std::fs::read_dir(&self.root).map_err(|e| SftError::io(&self.root, e))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let meta = e.path().join("meta.yaml");
            if name.chars().all(|c| c.is_ascii_digit()) && meta.exists() {
                out.push(read_yaml::<ExperimentMeta>(&meta)?);
            }
        }
        Ok(out)
    }

    /// The id of experiment `name`, created (next integer id) if missing.
    pub fn get_or_create_experiment(&self, name: &str) -> Result<String> {
        let exps = self.experiments()?;
        if let Some(e) = exps
            .iter()
            .find(|e| e.name == name && e.lifecycle_stage == "active")
        {
            return Ok(e.experiment_id.clone());
        }
        let next = exps
            .iter()
            .filter_map(|e| e.experiment_id.parse::<u64>().ok())
            .max()
            .map_or(0, |m| m + 1);
        let id = next.to_string();
        self.write_experiment(&id, name)?;
        Ok(id)
    }

    fn run_dir(&self, run_id: &str) -> Result<PathBuf> {
        if run_id.len() != 32 || !run_id.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(SftError::Mlflow(format!("invalid run id `{run_id}`")));
        }
        for e in std::fs::read_dir(&self.root)
            .map_err(|e| SftError::io(&self.root, e))?
            .flatten()
        {
            let d = e.path().join(run_id);
            if d.join("meta.yaml").exists() {
                return Ok(d);
            }
        }
        Err(SftError::Mlflow(format!(
            "run {run_id} not found in {}",
            self.root.display()
        )))
    }

    /// Copies `src` to `<run>/artifacts/<rel>`.
    pub fn put_artifact(
        &self,
        experiment_id: &str,
        run_id: &str,
        src: &Path,
        rel: &str,
    ) -> Result<()> {
        let dst = self
            .root
            .join(experiment_id)
            .join(run_id)
            .join("artifacts")
            .join(rel);
        if let Some(parent) = dst.parent() {
            mkdirs(parent)?;
        }
        std::fs::copy(src, &dst).map_err(|e| SftError::io(&dst, e))?;
        Ok(())
    }

    /// Creates a RUNNING run directory; returns its id.
    pub fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        start_time_ms: u64,
        tags: &[(String, String)],
    ) -> Result<String> {
        let exp_dir = self.root.join(experiment_id);
        if !exp_dir.join("meta.yaml").exists() {
            return Err(SftError::Mlflow(format!(
                "experiment {experiment_id} does not exist in {}",
                self.root.display()
            )));
        }
        let run_id = new_run_id();
        let dir = exp_dir.join(&run_id);
        for sub in ["metrics", "params", "tags", "artifacts"] {
            mkdirs(&dir.join(sub))?;
        }
        let user = tags
            .iter()
            .find(|(k, _)| k == "mlflow.user")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "unknown".into());
        write_yaml(
            &dir.join("meta.yaml"),
            &RunMeta {
                artifact_uri: file_uri(&dir.join("artifacts")),
                end_time: None,
                entry_point_name: String::new(),
                experiment_id: experiment_id.to_string(),
                lifecycle_stage: "active".into(),
                run_id: run_id.clone(),
                run_name: run_name.to_string(),
                run_uuid: run_id.clone(),
                source_name: String::new(),
                source_type: 4,
                source_version: String::new(),
                start_time: start_time_ms,
                status: RunStatus::Running.code(),
                tags: vec![],
                user_id: user,
            },
        )?;
        self.log_batch(&run_id, &[], &[], tags)?;
        Ok(run_id)
    }

    fn key_path(dir: &Path, kind: &str, key: &str) -> Result<PathBuf> {
        validate_key(key)?;
        let p = dir.join(kind).join(key);
        if let Some(parent) = p.parent() {
            mkdirs(parent)?;
        }
        Ok(p)
    }

    /// Appends metrics, writes params (immutable: a different value is an error) and tags.
    pub fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<()> {
        let dir = self.run_dir(run_id)?;
        for m in metrics {
            let p = Self::key_path(&dir, "metrics", &m.key)?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&p)
                .map_err(|e| SftError::io(&p, e))?;
            writeln!(f, "{} {} {}", m.timestamp_ms, fmt_value(m.value), m.step)
                .map_err(|e| SftError::io(&p, e))?;
        }
        for (k, v) in params {
            let p = Self::key_path(&dir, "params", k)?;
            if let Ok(old) = std::fs::read_to_string(&p) {
                if old != *v {
                    return Err(SftError::Mlflow(format!(
                        "param `{k}` already logged as `{old}`, cannot change it to `{v}`"
                    )));
                }
                continue;
            }
            atomic::write_bytes(&p, v.as_bytes())?;
        }
        for (k, v) in tags {
            let p = Self::key_path(&dir, "tags", k)?;
            atomic::write_bytes(&p, v.as_bytes())?;
        }
        Ok(())
    }

    /// Sets status and end time in the run's meta.yaml.
    pub fn set_terminated(&self, run_id: &str, status: RunStatus, end_time_ms: u64) -> Result<()> {
        let meta_path = self.run_dir(run_id)?.join("meta.yaml");
        let mut meta: RunMeta = read_yaml(&meta_path)?;
        meta.status = status.code();
        meta.end_time = Some(end_time_ms);
        write_yaml(&meta_path, &meta)
    }

    /// Reads a run's meta.yaml.
    pub fn run_meta(&self, run_id: &str) -> Result<RunMeta> {
        read_yaml(&self.run_dir(run_id)?.join("meta.yaml"))
    }
}

/// A metric value as the file store writes it (Python `float` repr-compatible: `nan`, `inf`).
fn fmt_value(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:?}")
    }
}

// ---------------------------------------------------------------- REST

/// A client of an MLflow tracking server (`MLFLOW_TRACKING_TOKEN` is sent as a bearer token).
pub struct RestClient {
    base_url: String,
    agent: ureq::Agent,
    token: Option<String>,
}

/// The string at JSON `pointer` of an MLflow REST response, or an error naming the endpoint.
fn string_at(v: &Value, pointer: &str, endpoint: &str) -> Result<String> {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| SftError::Mlflow(format!("{endpoint}: no {pointer} in the response {v}")))
}

impl RestClient {
    /// A client for the server at `base_url` (e.g. `http://127.0.0.1:5000`).
    pub fn new(base_url: &str) -> Result<Self> {
        if base_url.starts_with("https://") && !cfg!(feature = "mlflow-https") {
            return Err(SftError::Mlflow(format!(
                "{base_url}: https tracking servers need gptoss-sft's `mlflow-https` feature \
                 (rustls); plain http works without it"
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        Ok(Self {
            base_url: base_url.trim_end_matches('/').to_string(),
            agent,
            token: std::env::var("MLFLOW_TRACKING_TOKEN")
                .ok()
                .filter(|t| !t.is_empty()),
        })
    }

    fn url(&self, endpoint: &str) -> String {
        format!("{}/api/2.0/mlflow/{endpoint}", self.base_url)
    }

    fn finish(
        &self,
        endpoint: &str,
        r: std::result::Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Value)> {
        let mut resp = r.map_err(|e| SftError::Mlflow(format!("{}: {e}", self.url(endpoint))))?;
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| SftError::Mlflow(format!("{}: {e}", self.url(endpoint))))?;
        let v = if text.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&text).map_err(|e| {
                SftError::Mlflow(format!(
                    "{}: invalid JSON response ({e}): {text}",
                    self.url(endpoint)
                ))
            })?
        };
        Ok((status, v))
    }

    fn post(&self, endpoint: &str, body: Value) -> Result<Value> {
        let mut req = self
            .agent
            .post(&self.url(endpoint))
            .header("Content-Type", "application/json");
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let (status, v) = self.finish(endpoint, req.send(body.to_string()))?;
        if !(200..300).contains(&status) {
            return Err(SftError::Mlflow(format!(
                "POST {endpoint}: HTTP {status}: {v}"
            )));
        }
        Ok(v)
    }

    /// PUT `src` to the server's artifact proxy
    /// (`/api/2.0/mlflow-artifacts/artifacts/<experiment>/<run>/artifacts/<rel>`).
    pub fn put_artifact(
        &self,
        experiment_id: &str,
        run_id: &str,
        src: &Path,
        rel: &str,
    ) -> Result<()> {
        let url = format!(
            "{}/api/2.0/mlflow-artifacts/artifacts/{experiment_id}/{run_id}/artifacts/{rel}",
            self.base_url
        );
        let bytes = std::fs::read(src).map_err(|e| SftError::io(src, e))?;
        let mut req = self.agent.put(&url);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = req
            .send(&bytes[..])
            .map_err(|e| SftError::Mlflow(format!("PUT {url}: {e}")))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(SftError::Mlflow(format!(
                "PUT {url}: HTTP {status} (is the server serving artifacts? `mlflow server` does by default)"
            )));
        }
        Ok(())
    }

    /// GET experiments/get-by-name, else POST experiments/create.
    pub fn get_or_create_experiment(&self, name: &str) -> Result<String> {
        let endpoint = "experiments/get-by-name";
        let mut req = self
            .agent
            .get(&self.url(endpoint))
            .query("experiment_name", name);
        if let Some(t) = &self.token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let (status, v) = self.finish(endpoint, req.call())?;
        if (200..300).contains(&status) {
            if let Some(id) = v
                .pointer("/experiment/experiment_id")
                .and_then(Value::as_str)
            {
                return Ok(id.to_string());
            }
        } else if v.get("error_code").and_then(Value::as_str) != Some("RESOURCE_DOES_NOT_EXIST") {
            return Err(SftError::Mlflow(format!(
                "GET {endpoint}: HTTP {status}: {v}"
            )));
        }
        let v = self.post("experiments/create", json!({"name": name}))?;
        string_at(&v, "/experiment_id", "experiments/create")
    }

    /// POST runs/create.
    pub fn create_run(
        &self,
        experiment_id: &str,
        run_name: &str,
        start_time_ms: u64,
        tags: &[(String, String)],
    ) -> Result<String> {
        let user = tags
            .iter()
            .find(|(k, _)| k == "mlflow.user")
            .map(|(_, v)| v.clone())
            .unwrap_or_default();
        let v = self.post(
            "runs/create",
            json!({
                "experiment_id": experiment_id,
                "user_id": user,
                "run_name": run_name,
                "start_time": start_time_ms,
                "tags": kv(tags),
            }),
        )?;
        string_at(&v, "/run/info/run_id", "runs/create")
    }

    /// POST runs/log-batch.
    pub fn log_batch(
        &self,
        run_id: &str,
        metrics: &[Metric],
        params: &[(String, String)],
        tags: &[(String, String)],
    ) -> Result<()> {
        let metrics: Vec<Value> = metrics
            .iter()
            .map(|m| {
                json!({"key": m.key, "value": json_number(m.value), "timestamp": m.timestamp_ms, "step": m.step})
            })
            .collect();
        self.post(
            "runs/log-batch",
            json!({"run_id": run_id, "metrics": metrics, "params": kv(params), "tags": kv(tags)}),
        )?;
        Ok(())
    }

    /// POST runs/update.
    pub fn set_terminated(&self, run_id: &str, status: RunStatus, end_time_ms: u64) -> Result<()> {
        self.post(
            "runs/update",
            json!({"run_id": run_id, "status": status.name(), "end_time": end_time_ms}),
        )?;
        Ok(())
    }
}

fn kv(pairs: &[(String, String)]) -> Vec<Value> {
    pairs
        .iter()
        .map(|(k, v)| json!({"key": k, "value": v}))
        .collect()
}

/// MLflow's JSON encodes non-finite doubles as the strings "NaN" / "Infinity" / "-Infinity".
fn json_number(v: f64) -> Value {
    if v.is_nan() {
        json!("NaN")
    } else if v.is_infinite() {
        json!(if v > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values() {
        assert!(validate_key("train/loss").is_ok());
        assert!(validate_key("../x").is_err());
        assert!(validate_key("a//b").is_err());
        assert!(validate_key("").is_err());
        assert_eq!(fmt_value(0.0002), "0.0002");
        assert_eq!(fmt_value(1e-8), "1e-8");
        assert_eq!(fmt_value(2.0), "2.0");
        assert_eq!(fmt_value(f64::NAN), "nan");
        assert_eq!(new_run_id().len(), 32);
        let dir = tempfile::tempdir().unwrap();
        let uri = format!("file:{}", dir.path().join("m").display());
        match MlflowClient::from_uri(&uri).unwrap() {
            MlflowClient::File(f) => assert!(f.root().join("0/meta.yaml").is_file()),
            MlflowClient::Rest(_) => panic!("file URI gave a REST client"),
        }
        assert!(MlflowClient::from_uri("sqlite:///mlflow.db").is_err());
    }
}
