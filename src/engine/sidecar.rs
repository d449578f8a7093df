//! The repack sidecar: a shard's matrices in ggml's CPU repack layout, written once to a file
//! beside the shard and mapped read-only from then on, so the fast kernels run from shared,
//! evictable page cache instead of an anonymous copy the size of the weights (llama.cpp's way).
//!
//! File layout (`NAME.gguf.repack`; integers little-endian):
//!
//! ```text
//! 0        magic  b"SHNREPK\0"
//! 8        u32    header length H
//! 12       H      header, JSON: {"format": 2, "shard": KEY, "layout": LAYOUT,
//!                                "tensors": [{"name", "offset", "size"}, ...]}
//! ...      data   each tensor at its offset (a multiple of REPACK_ALIGN, after the header)
//! end-32   32     HMAC-SHA-256 (RFC 2104) of every byte before it, keyed by the node's secret
//! ```
//!
//! KEY names the shard's bytes (its info hash, or a SHA-1 of the whole file when the node has
//! none) and LAYOUT the ggml version and CPU features that chose the layout
//! ([`ggml::repack_layout_id`]). The tag binds all of it (header and data) to this node: the
//! secret is 32 random bytes in [`SECRET_FILE`] beside the shards (mode 0600, created once), so
//! whoever can write beside a shard but cannot read that file cannot make a sidecar the node
//! accepts. A sidecar whose key, layout, tensor list or tag does not match, or whose path is not
//! a regular file, is never used: it is rebuilt (written to a fresh temporary name created
//! exclusively, synced, renamed over), and the event is logged and counted ([`counters`]).

use super::ggml::{self, REPACK_ALIGN, WeightSpec};
use hmac::{Hmac, KeyInit, Mac};
use memmap2::Mmap;
use serde_json::{Value, json};
use sha2::Sha256;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

type HmacSha256 = Hmac<Sha256>;

const MAGIC: &[u8; 8] = b"SHNREPK\0";
/// 2: HMAC-SHA-256 trailer (1 had a SHA-1 of its own bytes, which anyone could recompute).
const FORMAT: u64 = 2;
const TRAILER: usize = 32;
/// A header longer than this is not ours (a shard has a few hundred tensors).
const MAX_HEADER: usize = 16 << 20;
/// The node's sidecar key, in the shards dir (beside the DHT's `.dht-nodes`).
pub const SECRET_FILE: &str = ".repack-key";
const SECRET_LEN: usize = 32;

static WRITTEN: AtomicU64 = AtomicU64::new(0);
static REJECTED: AtomicU64 = AtomicU64::new(0);
static CHANGED: AtomicU64 = AtomicU64::new(0);

/// Sidecar events since the process started (STATUS `inference.sidecars`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    /// Sidecars written (missing, stale or rejected before).
    pub written: u64,
    /// Sidecars found and refused: another shard, layout or format, a failed tag (corrupt,
    /// forged, another node's), not a regular file.
    pub rejected: u64,
    /// Loaded sidecars whose file changed under the map (edited in place): the shard is
    /// reloaded, which checks the tag again.
    pub changed: u64,
}

pub fn counters() -> Counters {
    Counters {
        written: WRITTEN.load(Ordering::Relaxed),
        rejected: REJECTED.load(Ordering::Relaxed),
        changed: CHANGED.load(Ordering::Relaxed),
    }
}

/// Where a shard's sidecar lives, what it must have been built from, and where the node's
/// secret is.
#[derive(Clone, Debug)]
pub struct Place {
    pub path: PathBuf,
    /// The shard's identity: its info hash (hex), or `sha1:` and the hex SHA-1 of the file.
    pub key: String,
    /// The node's sidecar key file ([`SECRET_FILE`] in the shard's directory).
    pub secret: PathBuf,
}

impl Place {
    /// The sidecar of the shard at `shard`: `shard` with `.repack` appended; the secret in the
    /// same directory.
    pub fn beside(shard: &Path, key: String) -> Place {
        let mut name = shard.as_os_str().to_owned();
        name.push(".repack");
        let dir = shard.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        Place { path: PathBuf::from(name), key, secret: dir.join(SECRET_FILE) }
    }
}

/// A key for a shard without an info hash: SHA-1 of all its bytes.
pub fn content_key(map: &[u8]) -> String {
    format!("sha1:{}", crate::hash::to_hex(&crate::hash::sha1(map)))
}

/// What identifies a file's contents to `fstat`: a write changes `mtime` and `ctime` (and
/// `ctime` cannot be set back), a replacement the inode.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(m: &std::fs::Metadata) -> Stamp {
        Stamp { ino: m.ino(), len: m.len(), mtime: (m.mtime(), m.mtime_nsec()), ctime: (m.ctime(), m.ctime_nsec()) }
    }
}

/// A sidecar that matched: its map, and each spec's offset in it (0 for specs not repacked).
pub struct Mapped {
    pub map: Mmap,
    pub offsets: Vec<usize>,
    file: File,
    stamp: Stamp,
}

impl Mapped {
    /// Whether the mapped file was written since its tag was checked (one `fstat`): an edit in
    /// place reaches the map, so the caller must load again (which checks the tag again).
    /// Logged and counted when it has.
    pub fn changed(&self, what: &str) -> bool {
        let now = self.file.metadata().map(|m| Stamp::of(&m));
        if now.as_ref().is_ok_and(|s| *s == self.stamp) {
            return false;
        }
        CHANGED.fetch_add(1, Ordering::Relaxed);
        crate::warn!(
            "repack sidecar of {what} changed on disk after its check ({now:?}, was {:?}): loading it again",
            self.stamp
        );
        true
    }
}

/// Why a sidecar was not used.
enum Refused {
    /// There is none.
    Absent,
    Bad(String),
}

/// Opens `path` for reading without following a symbolic link or blocking on a FIFO.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC).open(path)
}

/// Creates `path`, which must not exist (not even as a symbolic link), for writing with `mode`.
fn create_exclusive(path: &Path, mode: u32) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A fresh name beside `path`: `.NAME.tmp-` and 16 random hex digits.
fn temp_name(path: &Path) -> Result<PathBuf, String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or("path has no file name")?.to_string_lossy();
    let r = crate::protocol::auth::random_bytes::<8>().map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(dir.join(format!(".{name}.tmp-{}", crate::hash::to_hex(&r))))
}

/// The node's sidecar key at `path`: read when it is a regular file of 32 bytes owned by this
/// user, with one link and no permission for group or others; created (random, mode 0600)
/// when missing; replaced by a fresh one (logged: every sidecar is then rebuilt) when it is
/// anything else, so a key someone else could have planted or read is never used. An error
/// only when neither works (the caller falls back to the anonymous copy).
pub fn secret(path: &Path) -> Result<[u8; SECRET_LEN], String> {
    let replace = match read_secret(path) {
        Ok(s) => return Ok(s),
        Err(Refused::Absent) => false,
        Err(Refused::Bad(why)) => {
            crate::warn!("sidecar key {}: {why}; replacing it with a fresh one", path.display());
            true
        }
    };
    let tmp = temp_name(path)?;
    let written = (|| {
        let key = crate::protocol::auth::random_bytes::<SECRET_LEN>().map_err(|e| format!("/dev/urandom: {e}"))?;
        let mut f = create_exclusive(&tmp, 0o600).map_err(|e| format!("{}: {e}", tmp.display()))?;
        f.write_all(&key).and_then(|_| f.sync_all()).map_err(|e| format!("{}: {e}", tmp.display()))?;
        if replace {
            std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))?;
        } else {
            // A link never replaces: of two nodes creating the key at once, one key wins.
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    written?;
    read_secret(path).map_err(|r| match r {
        Refused::Absent => format!("{}: gone just after it was written", path.display()),
        Refused::Bad(why) => format!("{}: {why}", path.display()),
    })
}

fn read_secret(path: &Path) -> Result<[u8; SECRET_LEN], Refused> {
    let mut f = match open_nofollow(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Refused::Absent),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(Refused::Bad("a symbolic link".into())),
        Err(e) => return Err(Refused::Bad(e.to_string())),
    };
    let m = f.metadata().map_err(|e| Refused::Bad(e.to_string()))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !m.is_file() {
        return Err(Refused::Bad("not a regular file".into()));
    }
    if m.uid() != me {
        return Err(Refused::Bad(format!("owned by uid {}, not this node's {me}", m.uid())));
    }
    if m.mode() & 0o077 != 0 {
        return Err(Refused::Bad(format!("mode {:o}: group or others may use it", m.mode() & 0o777)));
    }
    if m.nlink() != 1 {
        return Err(Refused::Bad(format!("{} hard links", m.nlink())));
    }
    if m.len() != SECRET_LEN as u64 {
        return Err(Refused::Bad(format!("{} bytes, not {SECRET_LEN}", m.len())));
    }
    let mut key = [0u8; SECRET_LEN];
    f.read_exact(&mut key).map_err(|e| Refused::Bad(e.to_string()))?;
    // 32 equal bytes are no secret: a file allocated but never written (a crash, a restore of
    // sparse files) reads as zeros, and anyone can compute tags under it.
    if key.iter().all(|&b| b == key[0]) {
        return Err(Refused::Bad(format!("{SECRET_LEN} equal bytes ({:#04x}), not a random key", key[0])));
    }
    Ok(key)
}

/// The sidecar at `place` if it matches the shard and its tag holds, else a fresh one written
/// there and mapped: (its map, whether it was rebuilt), or why neither worked (no secret, the
/// directory not writable...: the caller falls back to the anonymous copy).
pub fn open_or_build(place: &Place, specs: &[WeightSpec], plan: &[bool]) -> Result<(Mapped, bool), String> {
    let secret = secret(&place.secret)?;
    match open(place, &secret, specs, plan) {
        Ok(m) => return Ok((m, false)),
        Err(Refused::Absent) => {}
        Err(Refused::Bad(why)) => {
            REJECTED.fetch_add(1, Ordering::Relaxed);
            crate::warn!("repack sidecar {} rejected, never used: {why}; rebuilding it", place.path.display());
        }
    }
    let t = std::time::Instant::now();
    let bytes = build(place, &secret, specs, plan)?;
    WRITTEN.fetch_add(1, Ordering::Relaxed);
    crate::info!(
        "repack sidecar {} written ({bytes} bytes, {:.0} ms)",
        place.path.display(),
        t.elapsed().as_secs_f64() * 1e3
    );
    match open(place, &secret, specs, plan) {
        Ok(m) => Ok((m, true)),
        Err(Refused::Absent) => Err("the sidecar just written is gone".into()),
        Err(Refused::Bad(e)) => Err(format!("the sidecar just written does not read back: {e}")),
    }
}

/// Maps the sidecar at `place` if it is a regular file built for this shard, this layout and
/// exactly the tensors `plan` picks of `specs`, and its tag under `secret` holds.
fn open(place: &Place, secret: &[u8], specs: &[WeightSpec], plan: &[bool]) -> Result<Mapped, Refused> {
    let bad = |s: String| Refused::Bad(s);
    let file = match open_nofollow(&place.path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Refused::Absent),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(bad("a symbolic link, not a sidecar".into())),
        Err(e) => return Err(bad(format!("{}: {e}", place.path.display()))),
    };
    let meta = file.metadata().map_err(|e| bad(format!("{}: {e}", place.path.display())))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    // SAFETY: a read-only map of a regular file; the node only ever replaces a sidecar by rename.
    // An edit in place by someone else reaches the map: `Mapped::changed` notices it (fstat).
    let map = unsafe { Mmap::map(&file) }.map_err(|e| bad(format!("{}: {e}", place.path.display())))?;
    if map.len() < MAGIC.len() + 4 + TRAILER || &map[..8] != MAGIC {
        return Err(bad("not a repack sidecar".into()));
    }
    let body = map.len() - TRAILER;
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(&map[..body]);
    if mac.verify_slice(&map[body..]).is_err() {
        return Err(bad("its HMAC does not hold: corrupt, forged, or written by another node or format".into()));
    }
    let h = u32::from_le_bytes(map[8..12].try_into().unwrap()) as usize;
    if h > MAX_HEADER || 12 + h > body {
        return Err(bad("header length out of range".into()));
    }
    let header: Value = serde_json::from_slice(&map[12..12 + h]).map_err(|e| bad(format!("header: {e}")))?;
    if header["format"].as_u64() != Some(FORMAT) {
        return Err(bad(format!("format {} (this build writes {FORMAT})", header["format"])));
    }
    if header["shard"].as_str() != Some(place.key.as_str()) {
        return Err(bad(format!("built for shard {}, this one is {}", header["shard"], place.key)));
    }
    let layout = ggml::repack_layout_id();
    if header["layout"].as_str() != Some(layout.as_str()) {
        return Err(bad(format!("built for {}, this build is {layout:?}", header["layout"])));
    }
    let listed = header["tensors"].as_array().ok_or_else(|| bad("header lists no tensors".into()))?;
    let wanted: Vec<(usize, &WeightSpec)> = specs.iter().enumerate().filter(|(i, _)| plan[*i]).collect();
    if listed.len() != wanted.len() {
        return Err(bad(format!("holds {} tensors, this shard repacks {}", listed.len(), wanted.len())));
    }
    let mut offsets = vec![0usize; specs.len()];
    let data_start = 12 + h;
    for (entry, (i, spec)) in listed.iter().zip(wanted) {
        let off = entry["offset"].as_u64().ok_or_else(|| bad("tensor without offset".into()))? as usize;
        let size = entry["size"].as_u64().ok_or_else(|| bad("tensor without size".into()))? as usize;
        if entry["name"].as_str() != Some(spec.name) || size != spec.data.len() {
            return Err(bad(format!("tensor {} does not match the shard's {}", entry["name"], spec.name)));
        }
        if off < data_start || off % REPACK_ALIGN != 0 || off.checked_add(size).is_none_or(|e| e > body) {
            return Err(bad(format!("tensor {} lies outside the data", spec.name)));
        }
        offsets[i] = off;
    }
    Ok(Mapped { map, offsets, file, stamp: Stamp::of(&meta) })
}

/// Writes the sidecar for `specs` (the tensors `plan` picks, repacked one at a time), tagged
/// under `secret`: to a fresh temporary name beside `place.path` (created exclusively, never
/// through a symbolic link, locked while written), synced, then renamed over it, so a reader
/// sees the old file or the whole new one. Temporary files of this sidecar left by an earlier
/// run (not locked by a writer) are removed first. Returns the bytes written.
fn build(place: &Place, secret: &[u8], specs: &[WeightSpec], plan: &[bool]) -> Result<u64, String> {
    remove_stale_temps(&place.path);
    let tmp = temp_name(&place.path)?;
    let result = write_to(&tmp, place, secret, specs, plan).and_then(|n| {
        std::fs::rename(&tmp, &place.path).map_err(|e| format!("renaming to {}: {e}", place.path.display()))?;
        Ok(n)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes `.NAME.tmp-*` beside `path` that no writer holds locked (a run that died while
/// writing). Only directory entries go (`unlink` never follows a link); a symbolic link
/// planted there is removed, its target untouched.
fn remove_stale_temps(path: &Path) {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let Some(name) = path.file_name() else { return };
    let prefix = format!(".{}.tmp-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(&prefix) {
            continue;
        }
        let p = e.path();
        let stale = match open_nofollow(&p) {
            // SAFETY: flock on a descriptor we own; LOCK_NB never waits.
            Ok(f) => {
                f.metadata().is_ok_and(|m| m.is_file())
                    && unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX | libc::LOCK_NB) } == 0
            }
            Err(e) => e.raw_os_error() == Some(libc::ELOOP),
        };
        if stale && std::fs::remove_file(&p).is_ok() {
            crate::info!("removed {}, left by a sidecar write that did not finish", p.display());
        }
    }
}

fn write_to(tmp: &Path, place: &Place, secret: &[u8], specs: &[WeightSpec], plan: &[bool]) -> Result<u64, String> {
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    // Lay the tensors out after a header whose size is known once the offsets are: offsets are
    // computed for a header padded to a fixed width, so writing it does not move them.
    let picked: Vec<&WeightSpec> = specs.iter().zip(plan).filter(|(_, p)| **p).map(|(s, _)| s).collect();
    let header_for = |data_start: usize| {
        let mut at = data_start;
        let tensors: Vec<Value> = picked
            .iter()
            .map(|s| {
                let off = at;
                at = (at + s.data.len()).next_multiple_of(REPACK_ALIGN);
                json!({"name": s.name, "offset": off, "size": s.data.len()})
            })
            .collect();
        let h = json!({"format": FORMAT, "shard": place.key, "layout": ggml::repack_layout_id(), "tensors": tensors});
        serde_json::to_vec(&h).expect("JSON values serialize")
    };
    // The header's length depends on the offsets' digits; two rounds settle it (padded with spaces).
    let mut len = header_for(4096).len();
    let data_start = (12 + len + 64).next_multiple_of(4096);
    let mut header = header_for(data_start);
    len = data_start - 12;
    if header.len() > len {
        return Err("sidecar header does not fit".into());
    }
    header.resize(len, b' ');

    let file = create_exclusive(tmp, 0o644).map_err(io)?;
    // Held until the file is closed: tells `remove_stale_temps` of another run this one is alive.
    // SAFETY: flock on a descriptor we own.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), libc::LOCK_EX | libc::LOCK_NB) };
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes any key length");
    let mut put = |out: &mut BufWriter<File>, bytes: &[u8]| -> Result<(), String> {
        mac.update(bytes);
        out.write_all(bytes).map_err(io)
    };
    put(&mut out, MAGIC)?;
    put(&mut out, &(len as u32).to_le_bytes())?;
    put(&mut out, &header)?;
    let mut at = data_start;
    for spec in &picked {
        let repacked = ggml::repack_one(spec)?;
        put(&mut out, &repacked)?;
        let end = at + repacked.len();
        let next = end.next_multiple_of(REPACK_ALIGN);
        put(&mut out, &vec![0u8; next - end])?;
        at = next;
    }
    drop(put);
    out.write_all(&mac.finalize().into_bytes()).map_err(io)?;
    let file = out.into_inner().map_err(|e| format!("{}: {}", tmp.display(), e.error()))?;
    file.sync_all().map_err(io)?;
    let mut file = file;
    let total = file.seek(SeekFrom::End(0)).map_err(io)?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shardnet-sidecar-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn temporary_files_are_created_exclusively_never_through_a_link() {
        let d = scratch("excl");
        let victim = d.join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let link = d.join(".x.repack.tmp-1");
        symlink(&victim, &link).unwrap();
        assert!(create_exclusive(&link, 0o644).is_err(), "created through a symbolic link");
        std::fs::remove_file(&link).unwrap();
        symlink(d.join("absent"), &link).unwrap();
        assert!(create_exclusive(&link, 0o644).is_err(), "created through a dangling link");
        assert!(!d.join("absent").exists());
        assert!(create_exclusive(&victim, 0o644).is_err(), "an existing file was opened");
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
        let a = temp_name(&d.join("x.repack")).unwrap();
        assert_ne!(a, temp_name(&d.join("x.repack")).unwrap(), "temporary names are predictable");
        assert!(a.file_name().unwrap().to_string_lossy().starts_with(".x.repack.tmp-"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_node_key_is_created_once_private_and_replaced_when_untrustworthy() {
        let d = scratch("key");
        let path = d.join(SECRET_FILE);
        let key = secret(&path).unwrap();
        let m = std::fs::symlink_metadata(&path).unwrap();
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), key);
        assert_eq!(secret(&path).unwrap(), key, "the key changed between loads");
        assert_ne!(key, [0u8; SECRET_LEN]);
        // Readable by others: replaced (a key someone may have read is never used).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let k2 = secret(&path).unwrap();
        assert_ne!(k2, key);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        // A symbolic link to a file of 32 known bytes: replaced, its target untouched.
        let planted = d.join("planted");
        std::fs::write(&planted, [7u8; SECRET_LEN]).unwrap();
        std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_file(&path).unwrap();
        symlink(&planted, &path).unwrap();
        let k3 = secret(&path).unwrap();
        assert_ne!(k3, [7u8; SECRET_LEN], "a key reached through a link was used");
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert_eq!(std::fs::read(&planted).unwrap(), [7u8; SECRET_LEN]);
        // A hard link to it (someone else holds a name for the key), the wrong length: replaced.
        std::fs::hard_link(&path, d.join("second-name")).unwrap();
        let k4 = secret(&path).unwrap();
        assert_ne!(k4, k3);
        std::fs::write(&path, [1u8; 16]).unwrap();
        assert_ne!(secret(&path).unwrap()[..16], [1u8; 16]);
        // Zeros (a file allocated but never written), private and of the right length: replaced.
        std::fs::write(&path, [0u8; SECRET_LEN]).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_ne!(secret(&path).unwrap(), [0u8; SECRET_LEN], "an all-zero key was used");
        let left: Vec<String> =
            std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        assert!(left.iter().all(|n| !n.contains(".tmp-")), "{left:?}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_loaded_sidecar_notices_a_write_in_place() {
        let d = scratch("stamp");
        let p = d.join("f");
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        let file = open_nofollow(&p).unwrap();
        let stamp = Stamp::of(&file.metadata().unwrap());
        // SAFETY: a read-only map of a file this test owns.
        let m = Mapped { map: unsafe { Mmap::map(&file) }.unwrap(), offsets: vec![], file, stamp };
        assert!(!m.changed("test"));
        {
            use std::io::{Seek, Write};
            let mut f = OpenOptions::new().write(true).open(&p).unwrap();
            f.seek(SeekFrom::Start(4096)).unwrap();
            f.write_all(&[2u8; 16]).unwrap();
        }
        assert!(m.changed("test"), "a write in place went unnoticed");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
