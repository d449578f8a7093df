//! Kademlia DHT compatible with BitTorrent's mainline DHT (BEP 5), sans-IO.
//!
//! - [`krpc`]    the messages (codec)
//! - [`budget`]  what may be sent to one address: packets a second, back-off
//! - [`routing`] k-buckets of good / questionable / bad nodes
//! - [`store`]   write tokens and announced peers
//! - [`lookup`]  one iterative lookup (alpha = 3, converges on the k closest)
//! - [`node`]    a node: answers queries, runs lookups and announces
//! - [`node_id`] node ids bound to IP addresses (BEP 42)
//! - [`sim`]     many nodes in virtual time, for tests and benchmarks

pub mod budget;
pub mod krpc;
pub mod lookup;
pub mod node;
pub mod node_id;
pub mod routing;
pub mod sim;
pub mod store;
