//! The TCP rendezvous of a data-parallel job on `MASTER_ADDR:port` (std::net only): rank 0
//! listens, every other rank connects and says who it is, rank 0 answers each with the same
//! payload (the NCCL unique id) once all have come. A rank missing at the deadline fails the
//! rendezvous on every rank, naming it.
//!
//! The connections then stay open as a liveness star ([`Meeting::watch`]): a rank whose process
//! dies closes its socket; rank 0 sees that, reports the rank to the others and to its own
//! failure handler, and a rank that loses rank 0 reports rank 0. So a dead rank makes the others
//! fail, naming it, instead of hanging in a collective. [`Watch::finish`] ends a run normally.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Result, SftError};

const MAGIC: &[u8; 8] = b"GPTOSSR1";
/// Liveness message: the sender ends its run normally.
const BYE: u8 = b'B';
/// Liveness message (rank 0 → others): the rank in the next 4 bytes died.
const DEAD: u8 = b'D';

/// What a failed rank makes the others do ([`Meeting::watch`]): called once, from a watcher
/// thread, with the error naming the rank.
pub type FailureHandler = Arc<dyn Fn(SftError) + Send + Sync>;

/// The handler of a process: prints the error and exits with status 1 (a collective in flight
/// would otherwise never return).
pub fn exit_on_failure() -> FailureHandler {
    Arc::new(|e: SftError| {
        eprintln!("error: {e}");
        std::process::exit(1);
    })
}

/// Where and how long the ranks meet.
#[derive(Debug, Clone)]
pub struct RendezvousSpec {
    /// This rank.
    pub rank: usize,
    /// Ranks of the job.
    pub world_size: usize,
    /// Host of rank 0.
    pub addr: String,
    /// TCP port on `addr`.
    pub port: u16,
    /// How long every rank waits for the others.
    pub timeout: Duration,
}

impl RendezvousSpec {
    fn err(&self, message: String) -> SftError {
        SftError::Distributed {
            rank: self.rank,
            world_size: self.world_size,
            message,
        }
    }
}

/// The outcome of [`meet`]: rank 0's payload and the open connections.
pub struct Meeting {
    spec: RendezvousSpec,
    /// Rank 0's payload, the same on every rank.
    pub payload: Vec<u8>,
    /// Rank 0: (rank, stream) of every other rank; others: rank 0's stream, as rank 0.
    links: Vec<(usize, TcpStream)>,
}

/// Meets the other ranks of `spec`: rank 0 computes `payload` and sends it to every other rank
/// once all have connected; the others receive it.
///
/// # Errors
/// [`SftError::Distributed`] naming the ranks that did not join by the deadline (on rank 0 and,
/// through its answer, on the others), or rank 0's address when it cannot be reached.
pub fn meet(spec: &RendezvousSpec, payload: impl FnOnce() -> Result<Vec<u8>>) -> Result<Meeting> {
    if spec.rank == 0 {
        host(spec, payload()?)
    } else {
        join(spec)
    }
}

fn host(spec: &RendezvousSpec, payload: Vec<u8>) -> Result<Meeting> {
    let deadline = Instant::now() + spec.timeout;
    let bind = format!("0.0.0.0:{}", spec.port);
    let listener = TcpListener::bind(&bind)
        .map_err(|e| spec.err(format!("rendezvous: cannot listen on {bind}: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| spec.err(format!("rendezvous: {e}")))?;
    let mut peers: Vec<Option<TcpStream>> = (0..spec.world_size).map(|_| None).collect();
    let mut joined = 1;
    while joined < spec.world_size {
        match listener.accept() {
            Ok((mut s, _)) => {
                let (rank, world) = match hello(&mut s, deadline) {
                    Ok(rw) => rw,
                    Err(_) => continue, // not one of ours (a port scan, a stale client)
                };
                if world != spec.world_size || rank == 0 || rank >= spec.world_size {
                    let msg = format!(
                        "rank {rank} joined with world size {world}, rank 0 has {}",
                        spec.world_size
                    );
                    let _ = answer(&mut s, 1, msg.as_bytes());
                    refuse_all(&mut peers, &msg);
                    return Err(spec.err(msg));
                }
                if peers[rank].is_some() {
                    let msg = format!("rank {rank} joined twice");
                    refuse_all(&mut peers, &msg);
                    return Err(spec.err(msg));
                }
                peers[rank] = Some(s);
                joined += 1;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (1..spec.world_size)
                        .filter(|&r| peers[r].is_none())
                        .collect();
                    let msg = format!(
                        "rank(s) {missing:?} did not join the rendezvous on port {} within {:.1} s",
                        spec.port,
                        spec.timeout.as_secs_f64()
                    );
                    refuse_all(&mut peers, &msg);
                    return Err(spec.err(msg));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(spec.err(format!("rendezvous: accept on {bind}: {e}"))),
        }
    }
    let mut links = Vec::with_capacity(spec.world_size - 1);
    for (rank, s) in peers.into_iter().enumerate() {
        if let Some(mut s) = s {
            answer(&mut s, 0, &payload)
                .map_err(|e| spec.err(format!("rendezvous: answering rank {rank}: {e}")))?;
            links.push((rank, s));
        }
    }
    Ok(Meeting {
        spec: spec.clone(),
        payload,
        links,
    })
}

/// Reads a rank's greeting: (rank, world size).
fn hello(s: &mut TcpStream, deadline: Instant) -> std::io::Result<(usize, usize)> {
    s.set_nonblocking(false)?;
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_millis(100))))?;
    let mut buf = [0u8; 16];
    s.read_exact(&mut buf)?;
    if &buf[..8] != MAGIC {
        return Err(std::io::Error::new(ErrorKind::InvalidData, "not a rank"));
    }
    let rank = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    let world = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]) as usize;
    Ok((rank, world))
}

/// Rank 0's answer: status (0: the payload follows; 1: an error message follows), length, bytes.
fn answer(s: &mut TcpStream, status: u8, bytes: &[u8]) -> std::io::Result<()> {
    let mut msg = vec![status];
    msg.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    msg.extend_from_slice(bytes);
    s.write_all(&msg)
}

fn refuse_all(peers: &mut [Option<TcpStream>], msg: &str) {
    for s in peers.iter_mut().flatten() {
        let _ = answer(s, 1, msg.as_bytes());
    }
}

fn join(spec: &RendezvousSpec) -> Result<Meeting> {
    let deadline = Instant::now() + spec.timeout;
    let target = format!("{}:{}", spec.addr, spec.port);
    let mut last = String::from("no address");
    let mut stream = None;
    while stream.is_none() {
        match target.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(&a, left.max(Duration::from_millis(50))) {
                        Ok(s) => {
                            stream = Some(s);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
            }
            Err(e) => last = e.to_string(),
        }
        if stream.is_none() {
            if Instant::now() >= deadline {
                return Err(spec.err(format!(
                    "could not reach rank 0 at {target} within {:.1} s ({last})",
                    spec.timeout.as_secs_f64()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let Some(mut s) = stream else {
        return Err(spec.err(format!("could not reach rank 0 at {target}")));
    };
    let io = |e: std::io::Error| spec.err(format!("rendezvous with rank 0 at {target}: {e}"));
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(spec.rank as u32).to_le_bytes());
    hello.extend_from_slice(&(spec.world_size as u32).to_le_bytes());
    s.write_all(&hello).map_err(io)?;
    // rank 0 answers once every rank has come, or at its own deadline: wait a little longer
    s.set_read_timeout(Some(spec.timeout + Duration::from_secs(5)))
        .map_err(io)?;
    let mut head = [0u8; 5];
    s.read_exact(&mut head).map_err(io)?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut bytes = vec![0u8; len];
    s.read_exact(&mut bytes).map_err(io)?;
    if head[0] != 0 {
        return Err(spec.err(format!(
            "rank 0 ended the rendezvous: {}",
            String::from_utf8_lossy(&bytes)
        )));
    }
    s.set_read_timeout(None).map_err(io)?;
    Ok(Meeting {
        spec: spec.clone(),
        payload: bytes,
        links: vec![(0, s)],
    })
}

impl Meeting {
    /// Watches the other ranks from now on: a rank whose connection closes before it said
    /// goodbye ([`Watch::finish`]) is reported to `on_failure` (rank 0 also tells the others).
    pub fn watch(self, on_failure: FailureHandler) -> Result<Watch> {
        let Meeting { spec, links, .. } = self;
        let done = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::with_capacity(links.len());
        for (rank, s) in &links {
            let w = s
                .try_clone()
                .map_err(|e| spec.err(format!("liveness link to rank {rank}: {e}")))?;
            writers.push((*rank, w));
        }
        let writers = Arc::new(Mutex::new(writers));
        for (peer, s) in links {
            let (spec, done, writers, on_failure) = (
                spec.clone(),
                done.clone(),
                writers.clone(),
                on_failure.clone(),
            );
            std::thread::spawn(move || watch_link(spec, peer, s, done, writers, on_failure));
        }
        Ok(Watch {
            done,
            writers,
            finished: false,
        })
    }
}

/// One watcher thread: reads the link to `peer` until goodbye, a death notice or its end.
fn watch_link(
    spec: RendezvousSpec,
    peer: usize,
    mut s: TcpStream,
    done: Arc<AtomicBool>,
    writers: Arc<Mutex<Vec<(usize, TcpStream)>>>,
    on_failure: FailureHandler,
) {
    let mut byte = [0u8; 1];
    let dead = loop {
        match s.read(&mut byte) {
            Ok(1) if byte[0] == BYE => return,
            Ok(1) if byte[0] == DEAD => {
                let mut r = [0u8; 4];
                break match s.read_exact(&mut r) {
                    Ok(()) => u32::from_le_bytes(r) as usize,
                    Err(_) => peer,
                };
            }
            Ok(1) => continue,
            Ok(_) | Err(_) => break peer,
        }
    };
    if done.load(Ordering::SeqCst) {
        return;
    }
    if spec.rank == 0 {
        if let Ok(mut ws) = writers.lock() {
            let mut msg = vec![DEAD];
            msg.extend_from_slice(&(dead as u32).to_le_bytes());
            for (r, w) in ws.iter_mut() {
                if *r != dead {
                    let _ = w.write_all(&msg);
                }
            }
        }
    }
    let how = if dead == peer {
        "closed its connection (its process died or failed)"
    } else {
        "died (reported by rank 0)"
    };
    on_failure(spec.err(format!("rank {dead} {how}")));
}

/// The running liveness watch of [`Meeting::watch`]. Dropping it without [`Self::finish`]
/// closes the links, which the other ranks report as this rank's failure.
pub struct Watch {
    done: Arc<AtomicBool>,
    writers: Arc<Mutex<Vec<(usize, TcpStream)>>>,
    finished: bool,
}

impl Watch {
    /// The normal end of a run: tells the others goodbye and stops watching.
    pub fn finish(mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Ok(mut ws) = self.writers.lock() {
            for (_, w) in ws.iter_mut() {
                let _ = w.write_all(&[BYE]);
            }
        }
        self.finished = true;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Ok(ws) = self.writers.lock() {
            for (_, w) in ws.iter() {
                let _ = w.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port")
    }

    fn spec(rank: usize, world: usize, port: u16, ms: u64) -> RendezvousSpec {
        RendezvousSpec {
            rank,
            world_size: world,
            addr: "127.0.0.1".into(),
            port,
            timeout: Duration::from_millis(ms),
        }
    }

    fn meet_all(ranks: &[usize], world: usize, port: u16, ms: u64) -> Vec<Result<Meeting>> {
        let threads: Vec<_> = ranks
            .iter()
            .map(|&r| {
                let s = spec(r, world, port, ms);
                std::thread::spawn(move || meet(&s, || Ok(b"unique-id".to_vec())))
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().expect("rank thread"))
            .collect()
    }

    #[test]
    fn ranks_meet_and_share_rank_0s_payload() -> Result<()> {
        let port = free_port();
        let (tx, rx) = mpsc::channel::<String>();
        let mut watches = Vec::new();
        for m in meet_all(&[0, 1, 2], 3, port, 10_000) {
            let m = m?;
            assert_eq!(m.payload, b"unique-id");
            let tx = Mutex::new(tx.clone());
            let h: FailureHandler = Arc::new(move |e| {
                let _ = tx.lock().map(|t| t.send(e.to_string()));
            });
            watches.push(m.watch(h)?);
        }
        for w in watches {
            w.finish();
        }
        assert!(rx.recv_timeout(Duration::from_millis(300)).is_err());
        Ok(())
    }

    #[test]
    fn a_missing_rank_fails_every_rank_named() {
        let port = free_port();
        let started = Instant::now();
        let out = meet_all(&[0, 1], 3, port, 500);
        assert!(started.elapsed() < Duration::from_secs(5));
        for r in out {
            let err = r.err().expect("rank 2 never came").to_string();
            assert!(err.contains("rank(s) [2] did not join"), "{err}");
        }
    }

    #[test]
    fn no_rank_0_names_its_address() {
        let port = free_port();
        let err = meet(&spec(1, 2, port, 300), || Ok(vec![]))
            .err()
            .expect("nobody listens")
            .to_string();
        assert!(
            err.contains(&format!("could not reach rank 0 at 127.0.0.1:{port}")),
            "{err}"
        );
    }

    #[test]
    fn a_rank_that_dies_is_named_by_the_others() -> Result<()> {
        let port = free_port();
        let (tx, rx) = mpsc::channel::<(usize, String)>();
        let mut watches = Vec::new();
        for (r, m) in meet_all(&[0, 1, 2], 3, port, 10_000)
            .into_iter()
            .enumerate()
        {
            let tx = Mutex::new(tx.clone());
            let h: FailureHandler = Arc::new(move |e| {
                let _ = tx.lock().map(|t| t.send((r, e.to_string())));
            });
            watches.push(m?.watch(h)?);
        }
        let dying = watches.pop().expect("rank 2");
        drop(dying); // rank 2's process "dies": its links close without goodbye
                     // the dying rank's own watcher may report too (its links closed): only ranks 0 and 1 count
        let mut seen: Vec<(usize, String)> = Vec::new();
        while seen.len() < 2 {
            let (r, e) = rx.recv_timeout(Duration::from_secs(5)).expect("a report");
            if r != 2 && !seen.iter().any(|(q, _)| *q == r) {
                seen.push((r, e));
            }
        }
        seen.sort();
        assert!(seen[0].1.contains("rank 0 of 3: rank 2 closed"), "{seen:?}");
        assert!(seen[1].1.contains("rank 1 of 3: rank 2 died"), "{seen:?}");
        for w in watches {
            w.finish();
        }
        Ok(())
    }
}
