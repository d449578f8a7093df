//! A torrent's bytes on disk.
//!
//! A download lives in `NAME.part`, created at full size (sparse). A piece is
//! gathered in memory (a [`PieceBuf`]), verified, and only then written in
//! place with one `pwrite` (a full disk is an error, where a store into a map
//! would be SIGBUS; and one large write costs a fraction of sixteen small
//! ones). Whole aligned pieces are written with direct I/O (`O_DIRECT`): the
//! data goes from the reused piece buffer to the disk without being copied
//! into fresh page-cache pages, which was most of a download's CPU time (see
//! docs/ARCHITECTURE.md); a filesystem that refuses direct I/O, and the short
//! last piece, are written through the page cache as before. Pieces
//! are read for rechecking and serving through a shared read-only map of the
//! same file (the page cache keeps both views coherent). `NAME.part.resume` records the verified pieces, written after
//! the data is synced, so a restart trusts it without rehashing. When every
//! piece verifies the file is synced and renamed to `NAME`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail, ensure};
use memmap2::Mmap;

use super::metainfo::InfoHash;
use super::picker::Lengths;
use super::wire::Bitfield;
use crate::bencode::{self, Value};

/// A read-only view of a torrent's file that hash workers may hold.
#[derive(Clone)]
pub struct View {
    map: Option<Arc<Mmap>>,
}

impl View {
    /// A read-only map of all of `file`.
    pub fn of_file(file: &File) -> Result<View> {
        map(file, file.metadata()?.len())
    }

    /// Bytes `[offset, offset + len)`; empty if out of range.
    pub fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        match &self.map {
            Some(m) if offset.checked_add(len).is_some_and(|e| e <= m.len() as u64) => {
                &m[offset as usize..(offset + len) as usize]
            }
            _ => &[],
        }
    }
}

/// Alignment of direct I/O: buffer address, file offset and length.
pub const DIRECT_ALIGN: usize = 4096;

/// `O_DIRECT` for `open(2)` on Linux (its value differs by architecture);
/// elsewhere direct I/O is not used.
const O_DIRECT: Option<i32> = if !cfg!(target_os = "linux") {
    None
} else if cfg!(any(target_arch = "aarch64", target_arch = "arm")) {
    Some(0o200000)
} else if cfg!(any(
    target_arch = "x86_64",
    target_arch = "x86",
    target_arch = "riscv64",
    target_arch = "loongarch64",
    target_arch = "s390x"
)) {
    Some(0o40000)
} else {
    None
};

/// `EINVAL`: what `write(2)` answers where the filesystem refuses direct I/O.
const EINVAL: i32 = 22;

/// One piece's bytes gathered in memory, starting on a [`DIRECT_ALIGN`]
/// boundary so that it can be written with direct I/O. Buffers are reused
/// from piece to piece: their memory is touched once, not once per piece.
pub struct PieceBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl PieceBuf {
    pub fn new(len: usize) -> PieceBuf {
        let raw = vec![0u8; len + DIRECT_ALIGN];
        // Where the allocator gave an aligned block already, or (in theory)
        // no offset could align it, the buffer starts at 0: still correct,
        // written through the page cache if unaligned.
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN).min(DIRECT_ALIGN);
        PieceBuf { raw, start, len }
    }

    /// Bytes this buffer can hold.
    pub fn capacity(&self) -> usize {
        self.raw.len() - self.start
    }

    /// Reuses the buffer for a piece of `len` bytes (at most its capacity);
    /// the old contents stay until overwritten.
    pub fn reuse(mut self, len: usize) -> PieceBuf {
        assert!(len <= self.capacity(), "piece of {len} bytes in a buffer of {}", self.capacity());
        self.len = len;
        self
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Writes verified pieces into a `.part` file; hash workers hold one.
#[derive(Clone)]
pub struct PieceWriter {
    file: Arc<File>,
    /// The same file opened for direct I/O, where the system allows it.
    direct: Option<Arc<File>>,
}

impl PieceWriter {
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let aligned = |x: usize| x.is_multiple_of(DIRECT_ALIGN);
        if let Some(direct) = &self.direct
            && aligned(offset as usize)
            && aligned(data.len())
            && aligned(data.as_ptr() as usize)
        {
            match direct.write_all_at(data, offset) {
                Ok(()) => return Ok(()),
                // This filesystem (or this range) takes no direct I/O:
                // the whole piece goes through the page cache instead.
                Err(e) if e.raw_os_error() == Some(EINVAL) => {}
                Err(e) => return Err(e),
            }
        }
        self.file.write_all_at(data, offset)
    }

    /// Whether aligned pieces go to the disk directly.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }
}

pub struct Storage {
    pub path: PathBuf,
    part: Option<PathBuf>,
    file: Arc<File>,
    direct: Option<Arc<File>>,
    view: View,
    lengths: Lengths,
}

/// `path` opened for direct writes, or `None` where the system has no
/// direct I/O or the filesystem refuses it (tmpfs before Linux 6.6, say).
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new().write(true).custom_flags(O_DIRECT?).open(path).ok()
}

fn map(file: &File, len: u64) -> Result<View> {
    if len == 0 {
        return Ok(View { map: None });
    }
    // SAFETY: a shared read-only map. Complete files are never written; a
    // .part file is written only by this node, by pwrite (direct or through
    // the page cache, which the kernel keeps coherent), into blocks that
    // are not being read (a piece is hashed and served only once all of its
    // blocks are in, and never written again after).
    let m = unsafe { Mmap::map(file) }?;
    Ok(View { map: Some(Arc::new(m)) })
}

/// The `.part` file of torrent `info_hash` named `name`: `NAME.<info hash hex>.part`. Keyed by
/// the info hash, so two torrents that share a name never share a `.part` (nor resume data).
pub fn part_path(dir: &Path, name: &str, info_hash: InfoHash) -> PathBuf {
    dir.join(format!("{name}.{}.part", info_hash.to_hex()))
}

/// The info hash a `.part` or `.part.resume` file name is keyed by, if it is one of ours.
pub fn part_info_hash(file_name: &str) -> Option<InfoHash> {
    let stem = file_name.strip_suffix(".part.resume").or_else(|| file_name.strip_suffix(".part"))?;
    let (_, hex) = stem.rsplit_once('.')?;
    InfoHash::from_hex(hex).filter(|_| hex.len() == 40)
}

/// Bytes free to an unprivileged writer on the filesystem holding `dir` (`statvfs(3)`:
/// `f_bavail * f_frsize`).
pub fn free_space(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "path holds a NUL"))?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call; `st` is a plain C struct
    // that statvfs fills (zeroed first, so no uninitialised read whatever the kernel does).
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// `.part` and `.part.resume` files in `dir` that no download uses (`active` says which info
/// hashes are downloading) and that nobody wrote for `max_age`: removed; returns their names.
/// Blocking (a directory listing): for a worker or the startup scan.
pub fn remove_stale_parts(dir: &Path, active: &dyn Fn(InfoHash) -> bool, max_age: std::time::Duration) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let now = std::time::SystemTime::now();
    let mut removed = Vec::new();
    for e in rd.filter_map(|e| e.ok()) {
        let Ok(name) = e.file_name().into_string() else { continue };
        if !(name.ends_with(".part") || name.ends_with(".part.resume")) {
            continue;
        }
        if part_info_hash(&name).is_some_and(active) {
            continue;
        }
        let Ok(md) = e.metadata() else { continue };
        let age = md.modified().ok().and_then(|t| now.duration_since(t).ok()).unwrap_or_default();
        if md.is_file() && age >= max_age && std::fs::remove_file(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

fn resume_path(part: &Path) -> PathBuf {
    part.with_extension("part.resume")
}

impl Storage {
    /// A complete file, for seeding.
    pub fn open_complete(path: &Path, lengths: Lengths) -> Result<Storage> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = file.metadata()?.len();
        ensure!(len == lengths.total, "{} is {len} bytes, the torrent says {}", path.display(), lengths.total);
        let view = map(&file, len)?;
        Ok(Storage { path: path.to_path_buf(), part: None, file: Arc::new(file), direct: None, view, lengths })
    }

    /// Opens or creates `NAME.part` in `dir`; returns the storage, the pieces
    /// a previous run verified (from the resume file), and whether the file
    /// has data but no usable resume file, so its pieces must be rechecked.
    /// `direct_io`: write whole aligned pieces with direct I/O where possible.
    pub fn open_part(
        dir: &Path,
        name: &str,
        info_hash: InfoHash,
        lengths: Lengths,
        direct_io: bool,
    ) -> Result<(Storage, Bitfield, bool)> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let part = part_path(dir, name, info_hash);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&part)
            .with_context(|| format!("opening {}", part.display()))?;
        let existing = file.metadata()?.len();
        let mut have = Bitfield::new(lengths.pieces);
        let mut recheck = false;
        if existing == lengths.total {
            match read_resume(&resume_path(&part), info_hash, lengths) {
                Some(bits) => have = bits,
                None => recheck = lengths.total > 0,
            }
        } else {
            file.set_len(lengths.total).with_context(|| format!("allocating {}", part.display()))?;
        }
        let view = map(&file, lengths.total)?;
        let direct = if direct_io { open_direct(&part).map(Arc::new) } else { None };
        let storage = Storage { path: dir.join(name), part: Some(part), file: Arc::new(file), direct, view, lengths };
        Ok((storage, have, recheck))
    }

    pub fn view(&self) -> View {
        self.view.clone()
    }

    pub fn is_complete_file(&self) -> bool {
        self.part.is_none()
    }

    /// A handle for writing verified pieces from a worker.
    pub fn writer(&self) -> PieceWriter {
        PieceWriter { file: self.file.clone(), direct: self.direct.clone() }
    }

    /// A job that syncs the data and writes the resume file, for a worker.
    pub fn resume_job(
        &self,
        info_hash: InfoHash,
        have: &Bitfield,
    ) -> Result<Option<impl FnOnce() -> Result<()> + Send + 'static>> {
        let Some(part) = &self.part else { return Ok(None) };
        let file = self.file.try_clone()?;
        let doc = bencode::dict([
            ("info_hash", Value::bytes(&info_hash.0[..])),
            ("length", Value::Int(self.lengths.total as i64)),
            ("pieces", Value::bytes(have.as_bytes())),
        ])
        .encode();
        let path = resume_path(part);
        Ok(Some(move || {
            file.sync_data()?;
            write_resume(&path, &doc)
        }))
    }

    /// A job that syncs the `.part` file, renames it to `NAME` (never over an existing file) and drops the resume
    /// file; after it succeeds, call [`Storage::finished`]. Blocking: for a worker.
    pub fn finish_job(&self) -> Result<impl FnOnce() -> Result<()> + Send + 'static> {
        let part = self.part.clone();
        let path = self.path.clone();
        let file = self.file.try_clone()?;
        Ok(move || {
            let Some(part) = part else { return Ok(()) };
            file.sync_all()?;
            // A hard link cannot replace an existing file: another verified file that holds
            // the name stays, and this download fails with the reason (never overwrites it).
            match std::fs::hard_link(&part, &path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    bail!("{} already exists (another file); keeping {}", path.display(), part.display())
                }
                Err(e) => return Err(e).with_context(|| format!("linking {} to {}", part.display(), path.display())),
            }
            std::fs::remove_file(&part).with_context(|| format!("removing {}", part.display()))?;
            let _ = std::fs::remove_file(resume_path(&part));
            Ok(())
        })
    }

    /// The file now lives under its final name and is never written again.
    pub fn finished(&mut self) {
        self.part = None;
        self.direct = None;
    }
}

/// Writes resume data `doc` to `path`: to a temporary file renamed over it, or, when the disk is
/// full (no room for the temporary file: ENOSPC), over the old file in place if it has the same
/// length (one torrent's resume data always has: its bitfield is as long as the piece count), which
/// needs no new blocks. A write torn by a crash then leaves some bytes old and some new: the
/// bits only grow while a `.part` is used and every set bit's piece was synced first, so a mix
/// still claims only verified pieces (red-team round 11: a full disk lost the resume data).
fn write_resume(path: &Path, doc: &[u8]) -> Result<()> {
    let tmp = path.with_extension("resume.tmp");
    let full = match std::fs::write(&tmp, doc) {
        Ok(()) => return Ok(std::fs::rename(&tmp, path)?),
        Err(e) if e.kind() == std::io::ErrorKind::StorageFull => e,
        Err(e) => return Err(e.into()),
    };
    let _ = std::fs::remove_file(&tmp);
    let old = OpenOptions::new().write(true).open(path);
    match old {
        Ok(f) if f.metadata()?.len() == doc.len() as u64 => {
            f.write_all_at(doc, 0).with_context(|| format!("rewriting {} in place", path.display()))?;
            f.sync_data()?;
            Ok(())
        }
        _ => Err(anyhow::Error::from(full)
            .context(format!("writing {} (no older resume data to rewrite in place)", tmp.display()))),
    }
}

fn read_resume(path: &Path, info_hash: InfoHash, lengths: Lengths) -> Option<Bitfield> {
    let bytes = std::fs::read(path).ok()?;
    if bytes.len() > 1 << 20 {
        return None;
    }
    let v = bencode::decode(&bytes).ok()?;
    if v.get("info_hash")?.as_bytes()? != info_hash.0 || v.get("length")?.as_int()? != lengths.total as i64 {
        return None;
    }
    Bitfield::from_wire(v.get("pieces")?.as_bytes()?, lengths.pieces)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_file_write_resume_and_finish() {
        let dir = std::env::temp_dir().join(format!("shardnet-storage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lengths = Lengths::new(100_000, 32768);
        let h = InfoHash([3; 20]);
        let (s, have, recheck) = Storage::open_part(&dir, "f.bin", h, lengths, true).unwrap();
        assert_eq!(have.count(), 0);
        assert!(!recheck, "a new file has nothing to check");
        s.writer().write(32768, &[7u8; 32768]).unwrap();
        assert_eq!(s.view().bytes(32768, 4), &[7, 7, 7, 7]);
        assert_eq!(s.view().bytes(99_999, 2), &[] as &[u8]);
        let mut bits = Bitfield::new(lengths.pieces);
        bits.set(1);
        s.resume_job(h, &bits).unwrap().expect("a part file")().unwrap();
        drop(s);
        let (mut s, have, recheck) = Storage::open_part(&dir, "f.bin", h, lengths, true).unwrap();
        assert_eq!(have, bits, "resume data trusted");
        assert!(!recheck);
        let (_, other, recheck) = Storage::open_part(&dir, "f.bin", InfoHash([4; 20]), lengths, false).unwrap();
        assert_eq!(other.count(), 0, "another torrent of the same name has its own .part");
        assert!(!recheck, "and it is new");
        assert!(part_path(&dir, "f.bin", InfoHash([4; 20])).exists());
        std::fs::remove_file(part_path(&dir, "f.bin", InfoHash([4; 20]))).unwrap();
        // A .part with data but no resume data is rechecked.
        std::fs::remove_file(dir.join(format!("f.bin.{}.part.resume", h.to_hex()))).unwrap();
        let (_, none, recheck) = Storage::open_part(&dir, "f.bin", h, lengths, false).unwrap();
        assert_eq!(none.count(), 0);
        assert!(recheck, "data without resume data is rechecked");
        s.resume_job(h, &bits).unwrap().expect("a part file")().unwrap();
        s.finish_job().unwrap()().unwrap();
        s.finished();
        assert!(dir.join("f.bin").exists() && !part_path(&dir, "f.bin", h).exists());
        assert!(!dir.join(format!("f.bin.{}.part.resume", h.to_hex())).exists());
        // The name is taken now: a second torrent's finished file does not replace it.
        let (other, _, _) = Storage::open_part(&dir, "f.bin", InfoHash([4; 20]), lengths, false).unwrap();
        let e = other.finish_job().unwrap()().unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert!(part_path(&dir, "f.bin", InfoHash([4; 20])).exists(), "kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A full disk (the temporary file's write fails with ENOSPC: here it is a link to
    /// `/dev/full`) still records the verified pieces, over the old resume data in place.
    #[test]
    fn resume_data_is_rewritten_in_place_when_the_disk_is_full() {
        let dir = std::env::temp_dir().join(format!("shardnet-resume-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (h, lengths) = (InfoHash([5; 20]), Lengths::new(100_000, 32768));
        let (s, _, _) = Storage::open_part(&dir, "f.bin", h, lengths, false).unwrap();
        let resume = dir.join(format!("f.bin.{}.part.resume", h.to_hex()));
        let tmp = dir.join(format!("f.bin.{}.part.resume.tmp", h.to_hex()));
        let full = |bits: &Bitfield| {
            let _ = std::fs::remove_file(&tmp);
            std::os::unix::fs::symlink("/dev/full", &tmp).unwrap();
            s.resume_job(h, bits).unwrap().expect("a part file")()
        };
        let mut bits = Bitfield::new(lengths.pieces);
        bits.set(0);
        let e = full(&bits).expect_err("no older resume data to rewrite");
        assert!(format!("{e:#}").contains("No space left"), "{e:#}");
        assert!(!tmp.exists() && !resume.exists());
        s.resume_job(h, &bits).unwrap().expect("a part file")().unwrap();
        bits.set(2);
        full(&bits).unwrap();
        assert!(!tmp.exists(), "the temporary link is removed");
        drop(s);
        let (_, have, recheck) = Storage::open_part(&dir, "f.bin", h, lengths, false).unwrap();
        assert_eq!((have, recheck), (bits, false), "the newer pieces are recorded");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn part_names_are_keyed_and_stale_ones_removed() {
        let dir = std::env::temp_dir().join(format!("shardnet-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (InfoHash([1; 20]), InfoHash([2; 20]));
        let pa = part_path(&dir, "x.gguf", a);
        assert_eq!(part_info_hash(pa.file_name().unwrap().to_str().unwrap()), Some(a));
        assert_eq!(part_info_hash(&format!("x.gguf.{}.part.resume", b.to_hex())), Some(b));
        assert_eq!(part_info_hash("x.gguf.part"), None);
        for n in [pa.clone(), part_path(&dir, "x.gguf", b), dir.join("old.gguf.part"), dir.join("keep.gguf")] {
            std::fs::write(n, b"x").unwrap();
        }
        assert!(remove_stale_parts(&dir, &|_| false, std::time::Duration::from_secs(3600)).is_empty(), "all fresh");
        let mut gone = remove_stale_parts(&dir, &|h| h == a, std::time::Duration::ZERO);
        gone.sort();
        assert_eq!(gone, vec!["old.gguf.part".to_string(), format!("x.gguf.{}.part", b.to_hex())]);
        assert!(pa.exists() && dir.join("keep.gguf").exists(), "an active download's .part and shards stay");
        assert!(free_space(&dir).unwrap() > 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn aligned_pieces_are_written_directly_and_read_back_through_the_map() {
        let dir = std::env::temp_dir().join(format!("shardnet-direct-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Three whole 64 KiB pieces and a short last one (not a multiple of 4096).
        let lengths = Lengths::new(3 * 65536 + 1000, 65536);
        let (s, _, _) = Storage::open_part(&dir, "d.bin", InfoHash([5; 20]), lengths, true).unwrap();
        let w = s.writer();
        if O_DIRECT.is_some() {
            assert!(w.is_direct(), "this filesystem takes O_DIRECT ({})", dir.display());
        }
        let mut buf = PieceBuf::new(65536);
        assert!((buf.as_slice().as_ptr() as usize).is_multiple_of(DIRECT_ALIGN));
        for piece in [2u64, 0, 1] {
            buf.as_mut_slice().fill(piece as u8 + 1);
            w.write(piece * 65536, buf.as_slice()).unwrap();
        }
        let last = buf.reuse(1000);
        assert_eq!(last.as_slice()[..3], [2, 2, 2], "reuse keeps the bytes until overwritten");
        let mut last = last;
        last.as_mut_slice().fill(9);
        w.write(3 * 65536, last.as_slice()).unwrap();
        // Unaligned data (an offset into a buffer) falls back to the page cache.
        w.write(65536 + 1, &[0xee; 10]).unwrap();
        let v = s.view();
        assert!(v.bytes(0, 65536).iter().all(|&b| b == 1));
        assert_eq!(v.bytes(65536, 2), &[2, 0xee]);
        assert!(v.bytes(2 * 65536, 65536).iter().all(|&b| b == 3));
        assert!(v.bytes(3 * 65536, 1000).iter().all(|&b| b == 9));
        s.file.sync_all().unwrap();
        let on_disk = std::fs::read(part_path(&dir, "d.bin", InfoHash([5; 20]))).unwrap();
        assert_eq!(on_disk.len() as u64, lengths.total);
        assert_eq!(&on_disk[65536..65538], &[2, 0xee]);
        assert!(on_disk[3 * 65536..].iter().all(|&b| b == 9));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
