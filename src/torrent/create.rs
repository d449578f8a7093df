//! Building metainfo for a file: its pieces hashed in parallel on a worker
//! pool, reading from a memory map of the file.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use anyhow::{Context, Result, anyhow, ensure};
use crossbeam_channel::{Receiver, bounded};
use memmap2::Mmap;

use super::metainfo::{Info, Metainfo, SourceStamp, check_file_name, piece_length_for};
use crate::hash::{self, Digest};
use crate::workers::PoolHandle;

/// Bytes hashed per job: large enough to amortise the hand-off, small enough
/// to spread one file over every worker.
const JOB_BYTES: u64 = 16 * 1024 * 1024;

/// The size, modification time, inode and status-change time of a file, as cached metadata
/// records them (see [`SourceStamp`]: the cache is trusted only when all four match).
pub fn stamp_of(meta: &std::fs::Metadata) -> SourceStamp {
    use std::os::unix::fs::MetadataExt;
    let mtime_ns =
        meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as i64);
    let ctime_ns = meta.ctime().saturating_mul(1_000_000_000).saturating_add(meta.ctime_nsec());
    SourceStamp { size: meta.len(), mtime_ns, inode: meta.ino(), ctime_ns }
}

/// A file whose pieces are being hashed by the pool.
pub struct PendingHash {
    name: String,
    length: u64,
    piece_length: u64,
    stamp: SourceStamp,
    jobs: usize,
    results: Receiver<(usize, Result<Vec<Digest>, String>)>,
}

/// Starts hashing `path`; `piece_length` of `None` picks one by size.
pub fn start_hashing(path: &Path, piece_length: Option<u64>, pool: &PoolHandle) -> Result<PendingHash> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow!("{}: file name is not UTF-8", path.display()))?
        .to_string();
    check_file_name(&name)?;
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let meta = file.metadata().with_context(|| format!("reading metadata of {}", path.display()))?;
    let stamp = stamp_of(&meta);
    let length = meta.len();
    // Listed with this reason, never seeded: libtorrent and Transmission refuse such a torrent.
    ensure!(length > 0, "zero-length file: not seeded (BitTorrent clients refuse a torrent of 0 bytes)");
    let piece_length = piece_length.unwrap_or_else(|| piece_length_for(length));
    let pieces = Info::piece_count(length, piece_length);
    let per_job = (JOB_BYTES / piece_length).max(1);
    let jobs = pieces.div_ceil(per_job) as usize;
    let (tx, results) = bounded(jobs.max(1));
    if length > 0 {
        // SAFETY: the map is read-only and shards are never written in place
        // (downloads go to NAME.part and are renamed when verified); a file
        // truncated under us by someone else is outside what we can defend.
        let map = Arc::new(unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?);
        let _ = map.advise(memmap2::Advice::Sequential);
        for job in 0..jobs {
            let (map, tx) = (map.clone(), tx.clone());
            let first = job as u64 * per_job;
            let last = (first + per_job).min(pieces);
            pool.submit(move || {
                let hashes = (first..last)
                    .map(|p| {
                        let start = (p * piece_length) as usize;
                        let end = ((p + 1) * piece_length).min(map.len() as u64) as usize;
                        hash::sha1(&map[start..end])
                    })
                    .collect();
                let _ = tx.send((job, Ok(hashes)));
            });
        }
    }
    Ok(PendingHash { name, length, piece_length, stamp, jobs, results })
}

impl PendingHash {
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Waits for every piece and assembles the metainfo.
    pub fn finish(self) -> Result<Metainfo> {
        let mut parts: Vec<Option<Vec<Digest>>> = vec![None; self.jobs];
        for _ in 0..self.jobs {
            let (job, hashes) = self.results.recv().map_err(|_| anyhow!("hash workers stopped"))?;
            parts[job] = Some(hashes.map_err(|e| anyhow!(e))?);
        }
        let pieces = parts.into_iter().flat_map(|p| p.expect("every job answered")).collect();
        let mut m =
            Metainfo::new(Info { name: self.name, length: self.length, piece_length: self.piece_length, pieces });
        m.source = Some(self.stamp);
        Ok(m)
    }
}

/// Hashes `path` and returns its metainfo.
pub fn create(path: &Path, piece_length: Option<u64>, pool: &PoolHandle) -> Result<Metainfo> {
    start_hashing(path, piece_length, pool)?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workers::WorkerPool;

    #[test]
    fn parallel_hashing_matches_sequential() {
        let dir = std::env::temp_dir().join(format!("shardnet-create-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.bin");
        let data: Vec<u8> = (0..(40u32 << 20) + 12345).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let pool = WorkerPool::new("test-hash", 3);
        let m = create(&path, Some(256 * 1024), &pool.handle()).unwrap();
        let expected: Vec<Digest> = data.chunks(256 * 1024).map(hash::sha1).collect();
        assert_eq!(m.info.pieces, expected);
        assert_eq!(m.info.length, data.len() as u64);
        let empty = dir.join("empty.bin");
        std::fs::write(&empty, b"").unwrap();
        let e = create(&empty, None, &pool.handle()).unwrap_err();
        assert!(format!("{e:#}").contains("zero-length file: not seeded"), "{e:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
