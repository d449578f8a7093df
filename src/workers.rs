//! A fixed pool of worker threads fed by a crossbeam channel.
//!
//! The node's hash workers: they hash pieces, read and write metadata, open
//! and map shards, so that the event-loop thread never blocks on disk or CPU.

use std::thread::JoinHandle;

use crossbeam_channel::{Sender, unbounded};

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct WorkerPool {
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

/// A cloneable handle for submitting jobs to a pool.
#[derive(Clone)]
pub struct PoolHandle {
    tx: Sender<Job>,
    size: usize,
}

impl WorkerPool {
    pub fn new(name: &str, size: usize) -> WorkerPool {
        let size = size.max(1);
        let (tx, rx) = unbounded::<Job>();
        let threads = (0..size)
            .map(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn(move || {
                        for job in rx {
                            job();
                        }
                    })
                    .expect("spawning a worker thread")
            })
            .collect();
        WorkerPool { tx: Some(tx), threads }
    }

    pub fn handle(&self) -> PoolHandle {
        PoolHandle { tx: self.tx.clone().expect("pool is open"), size: self.threads.len() }
    }
}

impl PoolHandle {
    pub fn submit(&self, job: impl FnOnce() + Send + 'static) {
        // The workers live as long as the pool; a send fails only during shutdown.
        let _ = self.tx.send(Box::new(job));
    }

    pub fn size(&self) -> usize {
        self.size
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.tx.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
