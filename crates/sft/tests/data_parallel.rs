//! Data parallel on CPU: ranks simulated as threads over the trainer's reduction interface
//! ([`ThreadGroup`]). `N` ranks × micro-batch `b` × accumulation `GA` must train what one rank
//! (the plain trainer, no reducer) trains with micro-batch `b` and accumulation `GA · N` — the
//! same global batch: the same step losses, logged records and final adapter (1e-6), for
//! N = 1, 2, 4, including a last step of an epoch that leaves a rank without a micro-batch.
//! Only rank 0 writes files, and a resumed 2-rank run continues the uninterrupted one.

mod trainer_support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use candle_core::Device;
use gptoss_sft::config::TrainingConfig;
use gptoss_sft::distributed::{GradReducer, ThreadGroup};
use gptoss_sft::logging::LogEntry;
use gptoss_sft::trainer::{NoObserver, TrainOutcome, TrainableAdapters, Trainer};
use gptoss_sft::{Result, SftError};
use trainer_support::{synthetic_rows, test_config, tiny_model};

/// 37 rows in micro-batches of 2: 19 micro-batches per epoch (the last of one row).
const ROWS: usize = 37;

struct RankRun {
    outcome: TrainOutcome,
    adapter: BTreeMap<String, Vec<f32>>,
}

fn adapter_values(a: &dyn TrainableAdapters) -> Result<BTreeMap<String, Vec<f32>>> {
    a.named_parameters()
        .into_iter()
        .map(|(k, v)| Ok((k, v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// One rank's training with `reducer` (`None`: the plain single-process trainer).
fn train_rank(
    cfg: TrainingConfig,
    reducer: Option<&dyn GradReducer>,
    save: bool,
) -> Result<RankRun> {
    let (model, adapters) = tiny_model(0, 1)?;
    let mut trainer = Trainer::new(&model, &adapters, cfg, synthetic_rows(ROWS), Device::Cpu)?
        .with_options(trainer_support::options());
    if let Some(r) = reducer {
        trainer = trainer.with_reducer(r);
    }
    let outcome = trainer.train(&mut NoObserver)?;
    if save {
        trainer.save_model(None)?;
    }
    Ok(RankRun {
        outcome,
        adapter: adapter_values(&adapters)?,
    })
}

/// `world` ranks as threads, rank `r` configured by `cfg_of(r)`; the runs by rank.
fn train_group(
    world: usize,
    cfg_of: impl Fn(usize) -> TrainingConfig,
    save: bool,
) -> Result<Vec<RankRun>> {
    let threads: Vec<_> = ThreadGroup::new(world, Duration::from_secs(120))
        .into_iter()
        .map(|g| {
            let cfg = cfg_of(g.rank());
            std::thread::spawn(move || train_rank(cfg, Some(&g), save))
        })
        .collect();
    threads
        .into_iter()
        .map(|t| {
            t.join()
                .map_err(|_| SftError::Trainer("rank panicked".into()))?
        })
        .collect()
}

fn tempdir() -> Result<tempfile::TempDir> {
    tempfile::tempdir().map_err(|e| SftError::io("tempdir", e))
}

fn config(out: &Path, ga: usize) -> TrainingConfig {
    let mut cfg = test_config(out);
    cfg.per_device_train_batch_size = 2;
    cfg.gradient_accumulation_steps = ga;
    cfg.learning_rate = 1e-2;
    cfg.shuffle = true;
    cfg
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 1e-6, "{what}: {a} vs {b}");
}

/// The step records of a log history (without the summary's run time).
fn step_records(h: &[LogEntry]) -> Vec<&gptoss_sft::logging::LogRecord> {
    h.iter().filter_map(LogEntry::as_step).collect()
}

fn assert_same_training(reference: &RankRun, rank: &RankRun, what: &str) {
    let (a, b) = (&reference.outcome, &rank.outcome);
    assert_eq!(a.global_step, b.global_step, "{what}: steps");
    assert_eq!(a.step_losses.len(), b.step_losses.len(), "{what}: steps");
    // step 1 starts from the same weights and sums the same per-micro-batch losses in the
    // same order: equal bits
    assert_eq!(a.step_losses[0], b.step_losses[0], "{what}: loss of step 1");
    for (s, (x, y)) in a.step_losses.iter().zip(&b.step_losses).enumerate() {
        close(*x, *y, &format!("{what}: loss of step {}", s + 1));
    }
    let (ra, rb) = (step_records(&a.log_history), step_records(&b.log_history));
    assert_eq!(ra.len(), rb.len(), "{what}: records");
    for (x, y) in ra.iter().zip(&rb) {
        let at = format!("{what}: step {}", x.step);
        assert_eq!((x.step, x.num_tokens), (y.step, y.num_tokens), "{at}");
        assert_eq!(x.epoch, y.epoch, "{at}: epoch");
        close(x.loss, y.loss, &format!("{at}: loss"));
        close(x.grad_norm, y.grad_norm, &format!("{at}: grad_norm"));
        close(
            x.mean_token_accuracy,
            y.mean_token_accuracy,
            &format!("{at}: acc"),
        );
        close(x.entropy, y.entropy, &format!("{at}: entropy"));
    }
    close(a.train_loss, b.train_loss, &format!("{what}: train_loss"));
    assert_eq!(reference.adapter.len(), rank.adapter.len());
    for (k, x) in &reference.adapter {
        let y = &rank.adapter[k];
        let worst = x
            .iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(worst <= 1e-6, "{what}: {k} differs by {worst}");
    }
}

#[test]
fn n_ranks_train_what_one_rank_trains_with_the_same_global_batch() -> Result<()> {
    let ga = 2;
    for world in [1, 2, 4] {
        let dir = tempdir()?;
        let single = train_rank(config(&dir.path().join("single"), ga * world), None, true)?;
        let rank_dir = |r: usize| dir.path().join(format!("rank{r}"));
        let ranks = train_group(world, |r| config(&rank_dir(r), ga), true)?;
        // 19 micro-batches of the epoch in steps of GA · N
        assert_eq!(
            single.outcome.global_step,
            19u64.div_ceil((ga * world) as u64)
        );
        for (r, run) in ranks.iter().enumerate() {
            assert_same_training(&single, run, &format!("N={world}, rank {r}"));
            // every rank holds the same adapter, bit for bit
            assert_eq!(
                run.adapter, ranks[0].adapter,
                "N={world}: rank {r} vs rank 0"
            );
            let wrote: Vec<PathBuf> = std::fs::read_dir(rank_dir(r))
                .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
                .unwrap_or_default();
            match r {
                0 => {
                    assert!(rank_dir(0).join("adapter_model.safetensors").is_file());
                    assert!(rank_dir(0).join("trainer_state.json").is_file());
                }
                _ => assert!(wrote.is_empty(), "rank {r} wrote {wrote:?}"),
            }
        }
    }
    Ok(())
}

#[test]
fn two_ranks_resume_from_rank_0s_checkpoint() -> Result<()> {
    let dir = tempdir()?;
    let shared = |sub: &str| {
        let mut c = config(&dir.path().join(sub), 2);
        c.num_train_epochs = 2.0; // 5 steps per epoch over 2 ranks: 10 steps
        c.save_steps = 4;
        c
    };
    let full = train_group(2, |_| shared("full"), false)?;
    let ckpt = dir.path().join("full").join("checkpoint-4");
    assert!(ckpt.join("adapter_model.safetensors").is_file());
    let resumed = train_group(
        2,
        |_| {
            let mut c = shared("resumed");
            c.resume_from_checkpoint = Some(ckpt.clone());
            c
        },
        false,
    )?;
    for r in 0..2 {
        let (a, b) = (&full[r].outcome, &resumed[r].outcome);
        assert_eq!(b.step_losses, a.step_losses[4..].to_vec(), "rank {r}");
        assert_eq!(resumed[r].adapter, full[r].adapter, "rank {r}");
    }
    Ok(())
}

/// A rank that logs its reductions in call order: `f64:{len}` and `bucket`.
struct Logged {
    inner: ThreadGroup,
    log: std::sync::Mutex<Vec<String>>,
}

impl Logged {
    fn push(&self, what: String) {
        if let Ok(mut l) = self.log.lock() {
            l.push(what);
        }
    }
}

impl GradReducer for Logged {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        self.push(format!("f64:{}", values.len()));
        self.inner.all_reduce_f64(values)
    }
    fn all_reduce_buckets(
        &self,
        buckets: Vec<candle_core::Tensor>,
    ) -> Result<Vec<candle_core::Tensor>> {
        self.inner.all_reduce_buckets(buckets)
    }
    fn start_bucket(
        &self,
        bucket: candle_core::Tensor,
    ) -> Result<gptoss_sft::distributed::PendingSum> {
        self.push("bucket".into());
        self.inner.start_bucket(bucket)
    }
}

/// With gradient checkpointing the step's last backward starts the buckets of each finished
/// layer before the step's statistics are reduced (DDP's overlap), and the result is still what
/// one rank trains: at N = 1 bit for bit, at N = 2 within 1e-6.
#[test]
fn gradient_buckets_start_during_the_last_backward() -> Result<()> {
    let ga = 2;
    let gc = |out: &Path, ga: usize| {
        let mut c = config(out, ga);
        c.gradient_checkpointing = true;
        c.max_steps = Some(3);
        c
    };
    for world in [1, 2] {
        let dir = tempdir()?;
        let single = train_rank(gc(&dir.path().join("single"), ga * world), None, false)?;
        let threads: Vec<_> = ThreadGroup::new(world, Duration::from_secs(120))
            .into_iter()
            .map(|g| {
                let cfg = gc(&dir.path().join(format!("rank{}", g.rank())), ga);
                std::thread::spawn(move || {
                    let r = Logged {
                        inner: g,
                        log: Default::default(),
                    };
                    let run = train_rank(cfg, Some(&r), false)?;
                    let log = r.log.into_inner().unwrap_or_default();
                    Ok::<_, SftError>((run, log))
                })
            })
            .collect();
        for (rank, t) in threads.into_iter().enumerate() {
            let (run, log) = t
                .join()
                .map_err(|_| SftError::Trainer("rank panicked".into()))??;
            let what = format!("N={world}, rank {rank}");
            if world == 1 {
                assert_eq!(run.adapter, single.adapter, "{what}: adapter bits");
                assert_eq!(
                    run.outcome.step_losses, single.outcome.step_losses,
                    "{what}"
                );
            }
            assert_same_training(&single, &run, &what);
            // each step: the loss-token count, then the buckets, then the statistics
            let stats = log
                .iter()
                .position(|l| l.starts_with("f64:") && l != "f64:1");
            let first_bucket = log.iter().position(|l| l == "bucket");
            match (first_bucket, stats) {
                (Some(b), Some(s)) => assert!(b < s, "{what}: {log:?}"),
                _ => panic!("{what}: no overlapped bucket in {log:?}"),
            }
            let buckets_per_step = log.iter().filter(|l| *l == "bucket").count() / 3;
            assert!(buckets_per_step >= 2, "{what}: {log:?}");
        }
    }
    Ok(())
}
