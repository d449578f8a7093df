//! Kademlia DHT compatible with BitTorrent's mainline DHT (BEP 5), sans-IO.
//!
//! - [`krpc`]    the messages (codec)
//! - [`routing`] k-buckets of good / questionable / bad nodes
//! - [`store`]   write tokens and announced peers
//! - [`lookup`]  one iterative lookup (alpha = 3, converges on the k closest)
//! - [`node`]    a node: answers queries, runs lookups and announces
//! - [`sim`]     many nodes in virtual time, for tests and benchmarks

pub mod krpc;
pub mod lookup;
pub mod node;
pub mod routing;
pub mod sim;
pub mod store;
