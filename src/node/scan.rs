//! The startup scan of the shards dir, on its own thread.
//!
//! Every `*.gguf` file is reported at once (with its GGUF parse result), then
//! gets torrent metadata: from `NAME.torrent` beside it when that file's
//! recorded size and mtime still match, else by hashing its pieces on the
//! hash workers (all files' pieces queued together so every worker is busy)
//! and saving the `.torrent` for the next start.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memmap2::Mmap;

use super::catalog::FileEntry;
use crate::gguf::{Gguf, ShardSummary};
use crate::torrent::Metainfo;
use crate::torrent::create::{self, stamp_of};
use crate::workers::PoolHandle;
use crate::{info, warn};

/// A cached `.torrent` larger than this is not ours (8 GiB at 256 KiB pieces
/// needs 640 KiB of piece hashes); it is ignored rather than read.
const MAX_TORRENT_FILE: u64 = 16 * 1024 * 1024;

pub enum ScanEvent {
    Found(FileEntry),
    /// `manifest.json` of the dir, when it has one: its bytes (for the pin's hash and
    /// GET_MANIFEST) and its shard table.
    Manifest(Vec<u8>, std::collections::BTreeMap<u32, (String, crate::torrent::InfoHash)>),
    /// Every file has been reported with `Found`.
    Listed,
    Metadata {
        filename: String,
        result: Result<Arc<Metainfo>, String>,
        cached: bool,
    },
    Done(ScanStats),
}

#[derive(Clone, Copy, Debug, Default)]
pub struct ScanStats {
    pub files: usize,
    pub cached: usize,
    pub hashed: usize,
    pub bytes_hashed: u64,
    pub elapsed: Duration,
}

pub use crate::torrent::torrent_path;

pub fn spawn(dir: PathBuf, pool: PoolHandle, notify: impl Fn(ScanEvent) + Send + 'static) {
    std::thread::Builder::new()
        .name("scan".into())
        .spawn(move || scan(&dir, &pool, &notify))
        .expect("spawning the scan thread");
}

fn scan(dir: &Path, pool: &PoolHandle, notify: &dyn Fn(ScanEvent)) {
    let started = Instant::now();
    let mut stats = ScanStats::default();
    let mut names: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.ends_with(".gguf") && !n.starts_with('.'))
            .collect(),
        Err(e) => {
            warn!("cannot list shards dir {}: {e}", dir.display());
            Vec::new()
        }
    };
    names.sort();

    let mut found = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if !meta.is_file() {
            continue;
        }
        let gguf = summarize(&path);
        if let Err(e) = &gguf {
            warn!("{name}: {e}; listed and seeded as a file, never loaded");
        }
        let entry = FileEntry {
            filename: name.clone(),
            path: path.clone(),
            size: meta.len(),
            gguf,
            meta: None,
            meta_error: None,
        };
        notify(ScanEvent::Found(entry));
        found.push((name, path, meta));
    }
    stats.files = found.len();
    if let Some((bytes, m)) = super::catalog::read_manifest(&dir.join(crate::gguf::split::MANIFEST)) {
        notify(ScanEvent::Manifest(bytes, m));
    }
    notify(ScanEvent::Listed);

    let mut pending = Vec::new();
    for (name, path, meta) in found {
        match read_cached(dir, &name, &meta) {
            Some(m) => {
                stats.cached += 1;
                notify(ScanEvent::Metadata { filename: name, result: Ok(Arc::new(m)), cached: true });
            }
            None => match create::start_hashing(&path, None, pool) {
                Ok(p) => pending.push((name, p)),
                Err(e) => notify(ScanEvent::Metadata { filename: name, result: Err(format!("{e:#}")), cached: false }),
            },
        }
    }
    for (name, p) in pending {
        let len = p.length();
        let t = Instant::now();
        let result = p.finish().map_err(|e| format!("{e:#}"));
        if let Ok(m) = &result {
            stats.hashed += 1;
            stats.bytes_hashed += len;
            info!(
                "hashed {name}: {} pieces, info hash {} ({:.0} ms after the wait)",
                m.info.pieces.len(),
                m.info_hash,
                t.elapsed().as_secs_f64() * 1e3
            );
            let target = torrent_path(dir, &name);
            let tmp = target.with_extension("torrent.tmp");
            if let Err(e) = std::fs::write(&tmp, m.to_torrent_bytes()).and_then(|_| std::fs::rename(&tmp, &target)) {
                warn!("cannot save {}: {e}", target.display());
            }
        }
        notify(ScanEvent::Metadata { filename: name, result: result.map(Arc::new), cached: false });
    }
    stats.elapsed = started.elapsed();
    notify(ScanEvent::Done(stats));
}

/// Reads a GGUF header and summarizes it; the error says why it is not a shard.
pub fn summarize(path: &Path) -> Result<ShardSummary, String> {
    let file = File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    if file.metadata().map_err(|e| e.to_string())?.len() == 0 {
        return Err("empty file, not GGUF".into());
    }
    // SAFETY: read-only map, see torrent::create.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| format!("cannot map: {e}"))?;
    Gguf::parse(&map).map(|g| ShardSummary::of(&g)).map_err(|e| e.to_string())
}

/// The cached metadata for `name`, if it was built from the file as it is now.
fn read_cached(dir: &Path, name: &str, meta: &std::fs::Metadata) -> Option<Metainfo> {
    let path = torrent_path(dir, name);
    if std::fs::metadata(&path).ok()?.len() > MAX_TORRENT_FILE {
        warn!("{}: larger than {MAX_TORRENT_FILE} bytes, ignored and rebuilt", path.display());
        return None;
    }
    let bytes = std::fs::read(&path).ok()?;
    let m = Metainfo::parse(&bytes).ok()?;
    let fresh = m.info.name == name && m.info.length == meta.len() && m.source == Some(stamp_of(meta));
    fresh.then_some(m)
}
