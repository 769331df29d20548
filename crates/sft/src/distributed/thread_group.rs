//! [`ThreadGroup`]: data-parallel ranks as threads of one process, reducing through a shared
//! buffer. Each round every rank deposits its values; once all have, every rank sums the
//! deposits in rank order (so all ranks get the same bits). A rank that has not deposited
//! within the timeout, or whose handle was dropped (its thread ended or failed), makes the
//! waiting ranks fail with [`SftError::Distributed`] naming it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};

use super::GradReducer;
use crate::error::{Result, SftError};

/// One rank's contribution to a round.
#[derive(Debug, Clone)]
enum Deposit {
    F64(Vec<f64>),
    F32(Vec<Vec<f32>>),
}

#[derive(Debug)]
struct State {
    /// Completed rounds.
    round: u64,
    /// This round's deposits, by rank.
    deposits: Vec<Option<Deposit>>,
    /// The deposits of the last completed round, by rank.
    last: Arc<Vec<Deposit>>,
    /// Ranks whose handle was dropped.
    gone: Vec<bool>,
}

#[derive(Debug)]
struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    changed: Condvar,
}

/// One rank of a group of threads ([`ThreadGroup::new`] makes all of them; move one into each
/// thread). Dropping a handle tells the others that this rank is gone.
#[derive(Debug)]
pub struct ThreadGroup {
    shared: Arc<Shared>,
    rank: usize,
}

impl ThreadGroup {
    /// The `world_size` handles of a new group, rank `i` at index `i`; a reduction waits at most
    /// `timeout` for the other ranks.
    pub fn new(world_size: usize, timeout: Duration) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            world: world_size,
            timeout,
            state: Mutex::new(State {
                round: 0,
                deposits: vec![None; world_size],
                last: Arc::new(Vec::new()),
                gone: vec![false; world_size],
            }),
            changed: Condvar::new(),
        });
        (0..world_size)
            .map(|rank| ThreadGroup {
                shared: shared.clone(),
                rank,
            })
            .collect()
    }

    fn err(&self, message: String) -> SftError {
        SftError::Distributed {
            rank: self.rank,
            world_size: self.shared.world,
            message,
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.shared
            .state
            .lock()
            .map_err(|_| self.err("a rank panicked while reducing".into()))
    }

    /// Deposits `mine` and returns every rank's deposit of this round, by rank.
    fn exchange(&self, mine: Deposit) -> Result<Arc<Vec<Deposit>>> {
        let world = self.shared.world;
        let mut st = self.lock()?;
        st.deposits[self.rank] = Some(mine);
        if st.deposits.iter().all(Option::is_some) {
            let all: Vec<Deposit> = st.deposits.iter_mut().filter_map(Option::take).collect();
            st.last = Arc::new(all);
            st.round += 1;
            self.shared.changed.notify_all();
            return Ok(st.last.clone());
        }
        let round = st.round;
        let deadline = Instant::now() + self.shared.timeout;
        loop {
            if st.round != round {
                return Ok(st.last.clone());
            }
            let missing: Vec<usize> = (0..world).filter(|&r| st.deposits[r].is_none()).collect();
            if let Some(&r) = missing.iter().find(|&&r| st.gone[r]) {
                return Err(self.err(format!(
                    "rank {r} left the group (its thread ended or failed) before reduction {}",
                    round + 1
                )));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(self.err(format!(
                    "rank(s) {missing:?} did not reach reduction {} within {:.1} s",
                    round + 1,
                    self.shared.timeout.as_secs_f64()
                )));
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .map_err(|_| self.err("a rank panicked while reducing".into()))?
                .0;
        }
    }
}

impl Drop for ThreadGroup {
    fn drop(&mut self) {
        if let Ok(mut st) = self.shared.state.lock() {
            st.gone[self.rank] = true;
            self.shared.changed.notify_all();
        }
    }
}

/// Element-wise sum of `parts` in order, checking that all have `n` elements.
fn sum_in_order<T: Copy + std::ops::Add<Output = T>>(
    parts: impl Iterator<Item = (usize, Vec<T>)>,
    n: usize,
    what: &str,
) -> std::result::Result<Vec<T>, String> {
    let mut acc: Option<Vec<T>> = None;
    for (rank, p) in parts {
        if p.len() != n {
            return Err(format!(
                "rank {rank} reduced {} {what} values, this rank {n}",
                p.len()
            ));
        }
        acc = Some(match acc {
            None => p,
            Some(a) => a.iter().zip(&p).map(|(&x, &y)| x + y).collect(),
        });
    }
    Ok(acc.unwrap_or_default())
}

impl GradReducer for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_f64(&self, values: &mut [f64]) -> Result<()> {
        let all = self.exchange(Deposit::F64(values.to_vec()))?;
        let parts = all.iter().enumerate().map(|(r, d)| match d {
            Deposit::F64(v) => (r, v.clone()),
            Deposit::F32(_) => (r, Vec::new()),
        });
        let sum = sum_in_order(parts, values.len(), "f64").map_err(|m| self.err(m))?;
        values.copy_from_slice(&sum);
        Ok(())
    }

    fn all_reduce_buckets(&self, buckets: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let devices: Vec<Device> = buckets.iter().map(|b| b.device().clone()).collect();
        let host = buckets
            .iter()
            .map(|b| Ok(b.to_vec1::<f32>()?))
            .collect::<Result<Vec<_>>>()?;
        let lens: Vec<usize> = host.iter().map(Vec::len).collect();
        let all = self.exchange(Deposit::F32(host))?;
        let mut out = Vec::with_capacity(lens.len());
        for (k, (&n, dev)) in lens.iter().zip(&devices).enumerate() {
            let parts = all.iter().enumerate().map(|(r, d)| match d {
                Deposit::F32(v) => (r, v.get(k).cloned().unwrap_or_default()),
                Deposit::F64(_) => (r, Vec::new()),
            });
            let what = format!("f32 (bucket {k})");
            let sum = sum_in_order(parts, n, &what).map_err(|m| self.err(m))?;
            out.push(Tensor::from_vec(sum, n, dev)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_the_sum_in_rank_order() -> Result<()> {
        let group = ThreadGroup::new(3, Duration::from_secs(10));
        let handles: Vec<_> = group
            .into_iter()
            .map(|g| {
                std::thread::spawn(move || -> Result<(Vec<f64>, Vec<f32>)> {
                    let r = g.rank() as f64;
                    let mut v = vec![r, 10.0 * r + 1.0];
                    g.all_reduce_f64(&mut v)?;
                    let t = Tensor::new(&[r as f32, 0.5], &Device::Cpu)?;
                    let out = g.all_reduce_buckets(vec![t])?;
                    Ok((v, out[0].to_vec1::<f32>()?))
                })
            })
            .collect();
        for h in handles {
            let (v, t) = h.join().expect("rank thread")?;
            assert_eq!(v, vec![3.0, 33.0]);
            assert_eq!(t, vec![3.0, 1.5]);
        }
        Ok(())
    }

    #[test]
    fn a_rank_that_leaves_is_named() {
        let mut group = ThreadGroup::new(2, Duration::from_secs(30));
        let r1 = group.pop().expect("rank 1");
        let r0 = group.pop().expect("rank 0");
        let t = std::thread::spawn(move || r0.all_reduce_f64(&mut [1.0]));
        std::thread::sleep(Duration::from_millis(50));
        drop(r1);
        let started = Instant::now();
        let err = t
            .join()
            .expect("rank 0 thread")
            .expect_err("rank 1 is gone");
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = err.to_string();
        assert!(msg.contains("rank 1 left the group"), "{msg}");
        assert!(msg.starts_with("distributed rank 0 of 2"), "{msg}");
    }

    #[test]
    fn a_rank_that_does_not_arrive_times_out_named() {
        let group = ThreadGroup::new(3, Duration::from_millis(200));
        let started = Instant::now();
        let err = group[0]
            .all_reduce_f64(&mut [1.0])
            .expect_err("ranks 1, 2 never come");
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(
            err.to_string().contains("rank(s) [1, 2] did not reach"),
            "{err}"
        );
    }
}
