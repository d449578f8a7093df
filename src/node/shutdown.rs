//! An orderly stop on SIGINT or SIGTERM: the signal handler (signal-hook's self-pipe) only
//! writes a byte to a socket the event loop polls; the loop then saves every download's resume
//! data and the DHT routing table, logs one line and returns, so the process exits 0.

use std::io::{self, Read};
use std::os::unix::net::UnixStream;

use anyhow::{Context, Result};
use mio::Interest;
use signal_hook::consts::{SIGINT, SIGTERM};

use super::{Node, SIGNAL};
use crate::{info, warn};

impl Node {
    /// Makes SIGINT and SIGTERM stop [`Node::run`] in order (it then returns `Ok`). Installs
    /// process-wide handlers: for binaries, not for a library embedding several nodes.
    pub fn stop_on_signals(&mut self) -> Result<()> {
        let (read, write) = UnixStream::pair().context("creating the signal socket pair")?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let mut read = mio::net::UnixStream::from_std(read);
        self.poll.registry().register(&mut read, SIGNAL, Interest::READABLE)?;
        signal_hook::low_level::pipe::register(SIGINT, write.try_clone()?).context("handling SIGINT")?;
        signal_hook::low_level::pipe::register(SIGTERM, write).context("handling SIGTERM")?;
        self.signals = Some(read);
        Ok(())
    }

    /// Drains the signal socket; true if a signal arrived.
    pub(super) fn signalled(&mut self) -> bool {
        let Some(s) = self.signals.as_mut() else { return false };
        let mut buf = [0u8; 64];
        let mut got = false;
        loop {
            match s.read(&mut buf) {
                Ok(0) => return got,
                Ok(_) => got = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return got,
            }
        }
    }

    /// Saves what a restart needs, synchronously: each download's verified pieces (its data
    /// synced first) and the DHT table. Logs one line.
    pub(super) fn shut_down(&mut self) {
        let mut saved = 0;
        for (h, swarm) in self.swarms.iter_mut() {
            if !self.downloads.contains_key(h) {
                continue;
            }
            let Some(have) = swarm.have().cloned() else { continue };
            let Some(storage) = swarm.storage_mut() else { continue };
            match storage.resume_job(*h, &have).map(|job| job.map(|job| job())) {
                Ok(Some(Ok(()))) => saved += 1,
                Ok(None) => {}
                Ok(Some(Err(e))) | Err(e) => warn!("saving resume data for {h}: {e:#}"),
            }
        }
        let table = match self.save_dht_table() {
            Some(Ok(n)) => format!("DHT table of {n} nodes saved"),
            Some(Err(e)) => format!("DHT table not saved: {e}"),
            None => "no DHT".into(),
        };
        info!("stopping on a signal: resume data of {saved} downloads saved, {table}");
    }
}
