//! BitTorrent: metainfo and magnet links, and building metainfo from files.

pub mod create;
pub mod picker;
pub mod storage;
pub mod swarm;
pub mod wire;
pub mod metainfo;

pub use metainfo::{InfoHash, Info, Magnet, Metainfo};
