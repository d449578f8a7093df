//! `shard_listener`: runs one shardnet node. See `--help`.

use std::io::Write;
use std::process::ExitCode;

use shardnet::config::{NODE_USAGE, NodeArgs, parse_node_args};
use shardnet::node::Node;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let config = match parse_node_args(&args) {
        Ok(NodeArgs::Run(c)) => *c,
        Ok(NodeArgs::Help) => {
            print!("{NODE_USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("shard_listener: {e}");
            return ExitCode::from(2);
        }
    };
    shardnet::log::set_level(config.log_level);
    let mut node = match Node::bind(config.clone()) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("shard_listener: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = node.stop_on_signals() {
        eprintln!("shard_listener: {e:#}");
        return ExitCode::FAILURE;
    }
    // One line on stdout that scripts and tests wait for.
    println!(
        "shard_listener listening on {}{} (cluster {}, shards dir {})",
        node.local_addr(),
        node.second_local_addr().map(|a| format!(" and {a}")).unwrap_or_default(),
        config.cluster,
        config.shards_dir.display()
    );
    let _ = std::io::stdout().flush();
    match node.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shard_listener: {e:#}");
            ExitCode::FAILURE
        }
    }
}
