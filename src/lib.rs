//! shardnet: a node for a peer-to-peer LLM inference network.
//!
//! Crate map (dependencies point downwards: codecs <- state <- node):
//! - [`hash`]      the one SHA-1 entry point every piece hash goes through
//! - [`log`]       one-line-per-event logging to stderr, with a global level
//! - [`addr`]      peer addresses as users write them (multiaddr and HOST:PORT)
//! - [`config`]    command-line flags of `shard_listener`
//! - [`bencode`]   strict bencode codec (BEP 3)
//! - [`dht`]       Kademlia (BEP 5): KRPC codec and routing table so far
//! - [`torrent`]   BitTorrent v1 metainfo, info hashes and magnet links
//! - [`gguf`]      GGUF v3 reader over a memory map, ggml type table
//! - [`engine`]    vendored ggml running LLaMA layer ranges; tokenizers, sampler
//! - [`chat`]      chat prompts from the model's Jinja chat template (minijinja)
//! - [`protocol`]  command protocol: frame codec, requests, responses, error codes
//! - [`node`]      the node: event loop, connections, shard catalog, workers
//! - [`workers`]   the worker thread pool (hash workers)
//! - [`client`]    blocking command-protocol client (shardctl, tests, benchmarks)
//! - [`coordinator`] `shardctl infer`/`serve`: places shards on a cluster, runs the chain, recovers
//! - [`serve`]     `shardctl serve`: the OpenAI-compatible HTTP/1.1 endpoint and chat page

pub mod addr;
pub mod bencode;
pub mod chat;
pub mod client;
pub mod config;
pub mod coordinator;
pub mod dht;
pub mod engine;
pub mod gguf;
pub mod hash;
pub mod log;
pub mod node;
pub mod protocol;
pub mod serve;
pub mod torrent;
pub mod workers;
