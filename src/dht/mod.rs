//! Kademlia DHT compatible with BitTorrent's mainline DHT (BEP 5), sans-IO.
//!
//! Built so far: the KRPC codec and the routing table. Still to come (the DHT
//! issue): tokens and the peer store, iterative lookups, the node that ties
//! them to timers, its place in the event loop, and the simulation.

pub mod krpc;
pub mod routing;
