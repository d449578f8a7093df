//! Command-line behaviour of the binaries: help, and bad flags exiting 2 with
//! one line naming the flag.

mod common;

use std::process::Command;

fn run(bin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(bin).args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn shard_listener_help_lists_every_flag() {
    let (code, out, _) = run(env!("CARGO_BIN_EXE_shard_listener"), &["--help"]);
    assert_eq!(code, Some(0));
    for flag in [
        "--listen",
        "--port",
        "--bootstrap",
        "--cluster",
        "--shard-id",
        "--total-shards",
        "--shards-dir",
        "--enable-torrent",
        "--max-frame",
        "--log-level",
        "--io-timeout",
        "--max-connections",
        "--max-unclassified",
        "--max-command-connections",
        "--max-command-connections-per-ip",
        "--max-peer-connections",
        "--max-peer-connections-per-ip",
        "--idle-timeout",
        "--frame-timeout",
        "--frame-memory",
        "--hash-workers",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
    }
}

#[test]
fn shard_listener_bad_flags_exit_2_with_one_line() {
    for (args, needle) in [
        (&["--bogus"][..], "--bogus"),
        (&["--port", "x"], "--port"),
        (&["--port", "65536"], "--port"),
        (&["--listen", "nowhere"], "--listen"),
        (&["--bootstrap", "/ip4/1.2.3/tcp/5"], "--bootstrap"),
        (&["--shard-id", "4096"], "--shard-id"),
        (&["--total-shards", "0"], "--total-shards"),
        (&["--max-frame", "12"], "--max-frame"),
        (&["--log-level"], "--log-level"),
        (&["--io-timeout", "0"], "--io-timeout"),
        (&["--frame-memory", "1048576"], "--frame-memory"),
        (&["--max-peer-connections-per-ip", "0"], "--max-peer-connections-per-ip"),
    ] {
        let (code, out, err) = run(env!("CARGO_BIN_EXE_shard_listener"), args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(out.is_empty());
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("shard_listener: ") && err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn shard_listener_reports_a_port_in_use() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = common::TempDir::new("cli");
    let (code, _, err) =
        run(env!("CARGO_BIN_EXE_shard_listener"), &["--listen", &addr, "--shards-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains(&addr) && err.contains("in use"), "{err}");
}

#[test]
fn shardctl_usage_errors_exit_2() {
    for args in [&[][..], &["--timeout", "0", "status"], &["load", "x"], &["send", "{nope"], &["torrent", "create"]] {
        let (code, _, err) = run(env!("CARGO_BIN_EXE_shardctl"), args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
    }
    let (code, out, _) = run(env!("CARGO_BIN_EXE_shardctl"), &["--help"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("torrent magnet"));
}

#[test]
fn shardctl_reports_a_node_that_is_not_there() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (code, _, err) = run(env!("CARGO_BIN_EXE_shardctl"), &["--node", &free, "--timeout", "2", "status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is shard_listener running there?"), "{err}");
}
