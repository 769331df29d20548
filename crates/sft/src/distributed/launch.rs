//! Where a rank learns its place in the job: torchrun's environment (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), Open MPI's (`OMPI_COMM_WORLD_RANK`, `…_SIZE`,
//! `…_LOCAL_RANK`) or Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`), read by a pure
//! function over a map ([`LaunchEnv::parse`]); and [`spawn_local_ranks`], the `--nproc-per-node`
//! launcher that re-executes the current program once per local rank with that environment.

use std::collections::HashMap;
use std::process::{Child, Command};
use std::time::Duration;

use crate::error::{Result, SftError};

/// torch's default `MASTER_PORT`.
pub const DEFAULT_MASTER_PORT: u16 = 29500;

/// Which launcher set the environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Launcher {
    /// No launcher variables: one rank.
    None,
    /// torchrun (or anything exporting `RANK` / `WORLD_SIZE`, like `--nproc-per-node`).
    Torchrun,
    /// `mpirun` of Open MPI.
    OpenMpi,
    /// `srun` of Slurm.
    Slurm,
}

/// A rank's place in the job and where the ranks meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Who set the variables.
    pub launcher: Launcher,
    /// Global rank, `0..world_size`.
    pub rank: usize,
    /// Ranks of the job.
    pub world_size: usize,
    /// Rank on this node (picks the GPU, see [`Self::device_ordinal`]).
    pub local_rank: usize,
    /// Host of rank 0 (`MASTER_ADDR`, default `127.0.0.1`).
    pub master_addr: String,
    /// The TCP port of the rendezvous on `master_addr`: `GPTOSS_RENDEZVOUS_PORT` if set, else
    /// `MASTER_PORT` (default 29500) — plus one under torchrun, whose own store already listens
    /// on `MASTER_PORT` (`TORCHELASTIC_USE_AGENT_STORE=True`).
    pub rendezvous_port: u16,
    /// How many CUDA devices `CUDA_VISIBLE_DEVICES` shows this process (`None`: not set).
    pub visible_devices: Option<usize>,
}

impl LaunchEnv {
    /// One rank, no launcher.
    pub fn single() -> Self {
        Self {
            launcher: Launcher::None,
            rank: 0,
            world_size: 1,
            local_rank: 0,
            master_addr: "127.0.0.1".into(),
            rendezvous_port: DEFAULT_MASTER_PORT,
            visible_devices: None,
        }
    }

    /// [`Self::parse`] of this process's environment.
    pub fn from_env() -> Result<Self> {
        Self::parse(&std::env::vars().collect())
    }

    /// The launch environment in `vars`: torchrun's variables first (torchrun inside a Slurm
    /// allocation sets both), then Open MPI's, then Slurm's; none of them is one rank.
    ///
    /// # Errors
    /// [`SftError::Config`] naming the variable when a value is not a number, a rank is not
    /// below the world size, or only part of a launcher's variables is set.
    pub fn parse(vars: &HashMap<String, String>) -> Result<Self> {
        let sets: [(Launcher, [&str; 3]); 3] = [
            (Launcher::Torchrun, ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
            (
                Launcher::OpenMpi,
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                ],
            ),
            (
                Launcher::Slurm,
                ["SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"],
            ),
        ];
        let Some((launcher, [rank_k, world_k, local_k])) = sets
            .iter()
            .find(|(_, keys)| vars.contains_key(keys[0]) || vars.contains_key(keys[1]))
            .copied()
        else {
            let mut single = Self::single();
            single.visible_devices = visible_devices(vars);
            return Ok(single);
        };
        let rank = number(vars, rank_k)?.ok_or_else(|| missing(rank_k, world_k))?;
        let world_size = number(vars, world_k)?.ok_or_else(|| missing(world_k, rank_k))?;
        // torchrun always sets LOCAL_RANK; elsewhere a missing local rank means one rank per node
        let local_rank = number(vars, local_k)?.unwrap_or(0);
        if world_size == 0 || rank >= world_size {
            return Err(SftError::config(
                rank_k,
                format!("rank {rank} is not below {world_k}={world_size}"),
            ));
        }
        let master_port = match number(vars, "MASTER_PORT")? {
            Some(p) => port(p, "MASTER_PORT")?,
            None => DEFAULT_MASTER_PORT,
        };
        let agent_store = vars
            .get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.eq_ignore_ascii_case("true"));
        let rendezvous_port = match number(vars, "GPTOSS_RENDEZVOUS_PORT")? {
            Some(p) => port(p, "GPTOSS_RENDEZVOUS_PORT")?,
            None if launcher == Launcher::Torchrun && agent_store => {
                master_port.checked_add(1).ok_or_else(|| {
                    SftError::config("MASTER_PORT", "65535 leaves no port for the rendezvous")
                })?
            }
            None => master_port,
        };
        Ok(Self {
            launcher,
            rank,
            world_size,
            local_rank,
            master_addr: vars
                .get("MASTER_ADDR")
                .filter(|a| !a.is_empty())
                .cloned()
                .unwrap_or_else(|| "127.0.0.1".into()),
            rendezvous_port,
            visible_devices: visible_devices(vars),
        })
    }

    /// The CUDA device ordinal of this rank: its local rank, wrapped into the devices
    /// `CUDA_VISIBLE_DEVICES` shows (Slurm's `--gpus-per-task=1` shows each task one GPU, its
    /// ordinal 0).
    pub fn device_ordinal(&self) -> usize {
        match self.visible_devices {
            Some(n) if n > 0 => self.local_rank % n,
            _ => self.local_rank,
        }
    }

    /// Whether this is a multi-rank job.
    pub fn is_distributed(&self) -> bool {
        self.world_size > 1
    }
}

fn missing(key: &str, other: &str) -> SftError {
    SftError::config(key, format!("{other} is set but {key} is not"))
}

fn number(vars: &HashMap<String, String>, key: &str) -> Result<Option<usize>> {
    match vars.get(key) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<usize>()
            .map(Some)
            .map_err(|_| SftError::config(key, format!("`{v}` is not a non-negative integer"))),
    }
}

fn port(p: usize, key: &str) -> Result<u16> {
    u16::try_from(p)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| SftError::config(key, format!("{p} is not a TCP port (1..=65535)")))
}

fn visible_devices(vars: &HashMap<String, String>) -> Option<usize> {
    vars.get("CUDA_VISIBLE_DEVICES")
        .map(|v| v.split(',').filter(|s| !s.trim().is_empty()).count())
}

/// The environment of local rank `rank` of `nproc` spawned by [`spawn_local_ranks`] (torchrun's
/// variable names, rank 0 on 127.0.0.1:`port`).
pub fn local_rank_env(nproc: usize, rank: usize, port: u16) -> Vec<(String, String)> {
    [
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", nproc.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("LOCAL_WORLD_SIZE", nproc.to_string()),
        ("MASTER_ADDR", "127.0.0.1".to_string()),
        ("MASTER_PORT", port.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// `--nproc-per-node N`: runs the current program `nproc` times with `args` (without the flag)
/// and [`local_rank_env`] (`MASTER_PORT` from the environment, default 29500), and waits. When a
/// rank exits with an error the others are killed and the error names that rank.
pub fn spawn_local_ranks(nproc: usize, args: &[String]) -> Result<()> {
    // Ctrl-C reaches every rank (same process group); this process keeps waiting for them
    crate::trainer::interrupt::install();
    let exe = std::env::current_exe().map_err(|e| SftError::io("current executable", e))?;
    let port = match number(&std::env::vars().collect(), "MASTER_PORT")? {
        Some(p) => port(p, "MASTER_PORT")?,
        None => DEFAULT_MASTER_PORT,
    };
    let mut children: Vec<(usize, Child)> = Vec::with_capacity(nproc);
    for rank in 0..nproc {
        let child = Command::new(&exe)
            .args(args)
            .envs(local_rank_env(nproc, rank, port))
            .spawn()
            .map_err(|e| SftError::io(&exe, e));
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                kill_all(&mut children);
                return Err(e);
            }
        }
    }
    let mut failed: Option<(usize, String)> = None;
    while !children.is_empty() && failed.is_none() {
        let mut i = 0;
        while i < children.len() {
            let (rank, child) = &mut children[i];
            match child.try_wait() {
                Ok(Some(status)) if status.success() => {
                    children.remove(i);
                }
                Ok(Some(status)) => {
                    failed = Some((*rank, status.to_string()));
                    break;
                }
                Ok(None) => i += 1,
                Err(e) => {
                    failed = Some((*rank, e.to_string()));
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    kill_all(&mut children);
    match failed {
        None => Ok(()),
        Some((rank, why)) => Err(SftError::Trainer(format!(
            "--nproc-per-node {nproc}: local rank {rank} failed ({why}); the other ranks were \
             stopped"
        ))),
    }
}

/// `args` without `flag` and its value (`--flag N` or `--flag=N`): the command line a spawned
/// rank runs.
pub fn args_without(args: &[String], flag: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip_value = false;
    for a in args {
        if skip_value {
            skip_value = false;
        } else if a == flag {
            skip_value = true;
        } else if !a.starts_with(&format!("{flag}=")) {
            out.push(a.clone());
        }
    }
    out
}

/// Kills and reaps the children still running (each by its own handle).
fn kill_all(children: &mut Vec<(usize, Child)>) {
    for (_, c) in children.iter_mut() {
        if let Ok(None) = c.try_wait() {
            let _ = c.kill();
        }
        let _ = c.wait();
    }
    children.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn no_launcher_is_one_rank() -> Result<()> {
        let e = LaunchEnv::parse(&env(&[("PATH", "/bin")]))?;
        assert_eq!(e, LaunchEnv::single());
        assert!(!e.is_distributed());
        Ok(())
    }

    #[test]
    fn torchrun_variables() -> Result<()> {
        let e = LaunchEnv::parse(&env(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node-a"),
            ("MASTER_PORT", "29400"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            // torchrun inside Slurm: torchrun's variables win
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
        ]))?;
        assert_eq!(e.launcher, Launcher::Torchrun);
        assert_eq!((e.rank, e.world_size, e.local_rank), (5, 8, 1));
        assert_eq!(e.master_addr, "node-a");
        // torchrun's agent store holds MASTER_PORT itself
        assert_eq!(e.rendezvous_port, 29401);
        assert_eq!(e.device_ordinal(), 1);
        Ok(())
    }

    #[test]
    fn slurm_and_open_mpi_variables() -> Result<()> {
        let e = LaunchEnv::parse(&env(&[
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_LOCALID", "3"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("CUDA_VISIBLE_DEVICES", "3"),
        ]))?;
        assert_eq!(e.launcher, Launcher::Slurm);
        assert_eq!((e.rank, e.world_size, e.local_rank), (3, 4, 3));
        assert_eq!(e.rendezvous_port, DEFAULT_MASTER_PORT);
        // --gpus-per-task=1: the one visible GPU is ordinal 0
        assert_eq!(e.device_ordinal(), 0);
        let e = LaunchEnv::parse(&env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("MASTER_PORT", "1234"),
            ("GPTOSS_RENDEZVOUS_PORT", "4321"),
        ]))?;
        assert_eq!(e.launcher, Launcher::OpenMpi);
        assert_eq!((e.rank, e.world_size, e.local_rank), (1, 2, 1));
        assert_eq!(e.master_addr, "127.0.0.1");
        assert_eq!(e.rendezvous_port, 4321);
        Ok(())
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: [(&[(&str, &str)], &str); 5] = [
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "`RANK`"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "`RANK`"),
            (&[("WORLD_SIZE", "2")], "`RANK`: WORLD_SIZE is set"),
            (&[("SLURM_PROCID", "0")], "`SLURM_NTASKS`"),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")],
                "`MASTER_PORT`",
            ),
        ];
        for (vars, key) in cases {
            let err = LaunchEnv::parse(&env(vars)).expect_err("invalid");
            assert!(err.to_string().contains(key), "{vars:?}: {err}");
        }
    }

    #[test]
    fn the_spawn_flag_is_dropped_from_the_ranks_command_line() {
        let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let args = a(&[
            "--max-steps",
            "3",
            "--nproc-per-node",
            "2",
            "--nproc-per-node=4",
            "x",
        ]);
        assert_eq!(
            args_without(&args, "--nproc-per-node"),
            a(&["--max-steps", "3", "x"])
        );
    }

    #[test]
    fn spawned_ranks_get_torchrun_variables() -> Result<()> {
        let vars: HashMap<String, String> = local_rank_env(4, 2, 29555).into_iter().collect();
        let e = LaunchEnv::parse(&vars)?;
        assert_eq!((e.rank, e.world_size, e.local_rank), (2, 4, 2));
        assert_eq!(
            (e.master_addr.as_str(), e.rendezvous_port),
            ("127.0.0.1", 29555)
        );
        Ok(())
    }
}
