//! BitTorrent: metainfo and magnet links, and building metainfo from files.

pub mod create;
pub mod metainfo;
pub mod picker;
pub mod storage;
pub mod swarm;
pub mod utp;
pub mod wire;

pub use metainfo::{Info, InfoHash, Magnet, Metainfo};
