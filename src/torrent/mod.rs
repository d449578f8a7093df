//! BitTorrent: metainfo and magnet links, and building metainfo from files.

pub mod create;
pub mod metainfo;
pub mod mse;
pub mod picker;
pub mod storage;
pub mod swarm;
pub mod utp;
pub mod wire;

pub use metainfo::{Info, InfoHash, Magnet, Metainfo};

/// Where the metadata of `filename` is kept: `NAME.torrent` beside `NAME` in `dir` (what the
/// node's scan caches and `shardctl split` writes).
pub fn torrent_path(dir: &std::path::Path, filename: &str) -> std::path::PathBuf {
    dir.join(format!("{filename}.torrent"))
}
