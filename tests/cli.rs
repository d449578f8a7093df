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
        "--peer-shed-grace",
        "--idle-timeout",
        "--frame-timeout",
        "--frame-memory",
        "--hash-workers",
    ] {
        assert!(out.contains(flag), "{flag} missing from --help");
    }
}

/// The README's `shard_listener` and `shardctl` sections show each binary's `--help` as it is,
/// so a flag added to one is never missing from the other.
#[test]
fn the_readme_shows_each_binarys_help_verbatim() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for (section, bin) in [
        ("## `shard_listener`", env!("CARGO_BIN_EXE_shard_listener")),
        ("## `shardctl`", env!("CARGO_BIN_EXE_shardctl")),
    ] {
        let at = readme.find(section).unwrap_or_else(|| panic!("README has no {section} section"));
        let block = readme[at..].split("```\n").nth(1).unwrap_or_else(|| panic!("no code block under {section}"));
        let (code, help, _) = run(bin, &["--help"]);
        assert_eq!(code, Some(0));
        if block != help {
            let first = block.lines().zip(help.lines()).position(|(a, b)| a != b);
            panic!(
                "README's {section} block differs from `{bin} --help` (first differing line: {first:?}); paste the \
                 help output there\n--- README\n{block}\n--- help\n{help}"
            );
        }
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

/// Every usage error of `shardctl`: exit status 2, nothing on stdout, and exactly this one line on
/// stderr (the command, then what is missing or wrong, naming the argument).
#[test]
fn shardctl_usage_errors_exit_2_naming_the_argument() {
    let cases: &[(&[&str], &str)] = &[
        (&[], "no command given (see --help)"),
        (&["frob"], "unknown command \"frob\" (see --help)"),
        (&["--node", "nonsense", "status"], "--node: \"nonsense\" is not HOST:PORT or a multiaddr"),
        (&["--node"], "--node needs a value"),
        (&["--node", "/ip4/1.2.3/tcp/5", "list"], "--node: \"1.2.3\" in \"/ip4/1.2.3/tcp/5\" is not an IPv4 address"),
        (&["--timeout", "0", "status"], "--timeout \"0\" is not 1-86400 seconds"),
        (&["list", "extra"], "list: unexpected argument \"extra\" (see --help)"),
        (&["status", "extra"], "status: unexpected argument \"extra\" (see --help)"),
        (&["load"], "load: missing the shard id N (see --help)"),
        (&["load", "--no-wait"], "load: missing the shard id N (see --help)"),
        (&["load", "x"], "load: shard id \"x\" is not a whole number"),
        (&["load", "1", "--peer"], "load: --peer needs a value"),
        (&["load", "1", "--frob"], "load: unknown flag --frob (see --help)"),
        (&["send"], "send: missing the JSON request (see --help)"),
        (&["send", "{nope"], "send: not JSON: key must be a string at line 1 column 2"),
        (&["send", "{}", "more"], "send: unexpected argument \"more\" (see --help)"),
        (&["peers"], "peers: missing KEY, --shard N or --cluster (see --help)"),
        (&["peers", "--shard"], "peers: --shard needs a value"),
        (&["peers", "--shard", "x"], "peers: --shard \"x\" is not a shard id"),
        (&["peers", "--frob"], "peers: unknown flag --frob (see --help)"),
        (&["peers", "a", "b"], "peers: unexpected argument \"b\" (see --help)"),
        (&["split"], "split: missing MODEL.gguf (see --help)"),
        (&["split", "m.gguf", "--out", "d"], "split: missing --shards N (N >= 1)"),
        (&["split", "m.gguf", "--shards", "2"], "split: missing --out DIR"),
        (&["split", "m.gguf", "--shards", "two", "--out", "d"], "split: --shards \"two\" is not a number"),
        (&["demo-model"], "demo-model: missing --out FILE"),
        (&["demo-model", "--out", "f", "--type", "q9"], "demo-model: --type \"q9\" is not f32, f16, q8_0 or q4_0"),
        (&["demo-model", "--out", "f", "--layers", "1", "--layers", "2"], "demo-model: --layers given twice"),
        (&["inspect"], "inspect: missing FILE.gguf (see --help)"),
        (&["tokenize"], "tokenize: missing MODEL.gguf (see --help)"),
        (&["tokenize", "m.gguf", "a", "b"], "tokenize: unexpected argument \"b\" (one TEXT at most)"),
        (&["generate"], "generate: missing MODEL.gguf (see --help)"),
        (&["generate", "--prompt", "hi"], "generate: missing MODEL.gguf (see --help)"),
        (&["generate", "m.gguf"], "generate: missing --prompt TEXT (or --prompt-ids)"),
        (&["generate", "m.gguf", "--prompt"], "generate: --prompt needs a value"),
        (&["generate", "m.gguf", "--bogus"], "generate: unknown flag --bogus (see --help)"),
        (&["generate", "m.gguf", "stray"], "generate: unexpected argument \"stray\" (see --help)"),
        (&["generate", "m.gguf", "--prompt", "a", "-n", "x"], "generate: -n \"x\" is not a number"),
        (&["generate", "m.gguf", "--prompt", "a", "--batch", "0"], "generate: --batch must be at least 1"),
        (&["generate", "m.gguf", "--prompt", "a", "--temp", "-1"], "generate: --temp must be >= 0, got -1"),
        (&["generate", "m.gguf", "--prompt", "a", "--top-p", "0"], "generate: --top-p must be in (0, 1], got 0"),
        (
            &["generate", "m.gguf", "--prompt", "a", "--repeat-penalty", "0"],
            "generate: --repeat-penalty must be > 0 (1 is off), got 0",
        ),
        (&["generate", "m.gguf", "--prompt", "a", "--system", "s"], "generate: --system needs --chat"),
        (&["generate", "m.gguf", "--prompt", "a", "--chat-template", "t"], "generate: --chat-template needs --chat"),
        (
            &["generate", "m.gguf", "--chat", "--prompt-ids", "1"],
            "generate: --chat and --prompt-ids exclude each other",
        ),
        (
            &["generate", "m.gguf", "--chat", "--prompt", "a", "--no-special"],
            "generate: --chat and --no-special exclude each other",
        ),
        (&["infer"], "infer: missing --prompt TEXT"),
        (&["infer", "--prompt", "a", "--presence-penalty", "3"], "infer: --presence-penalty must be in [-2, 2], got 3"),
        (&["infer", "--prompt", "a", "--frequency-penalty", "x"], "infer: --frequency-penalty \"x\" is not a number"),
        (&["chat", "--repeat-last-n", "-2"], "chat: --repeat-last-n must be >= -1 (-1: the whole context), got -2"),
        (
            &["chat", "--model", "m.gguf", "--bootstrap", "127.0.0.1:1"],
            "chat: --model and --bootstrap exclude each other",
        ),
        (&["chat", "--ctx", "64"], "chat: --ctx needs --model (nodes set their own)"),
        (&["chat", "--bogus"], "chat: unknown flag --bogus (see --help)"),
        (&["chat", "--batch", "0"], "chat: --batch must be at least 1"),
        (
            &["infer", "--prompt", "a", "--bootstrap", "zz"],
            "infer: --bootstrap: \"zz\" is not HOST:PORT or a multiaddr",
        ),
        (&["infer", "--prompt", "a", "--session", ""], "infer: --session must be 1-128 bytes"),
        (&["infer", "--prompt", "a", "--batch", "0"], "infer: --batch must be at least 1"),
        (&["fetch"], "fetch: missing TORRENT or MAGNET (see --help)"),
        (&["fetch", "x.torrent", "--peer", "127.0.0.1:1"], "fetch: missing --out DIR"),
        (&["fetch", "x.torrent", "--out", "d"], "fetch: missing --peer IP:PORT (at least one)"),
        (&["fetch", "x.torrent", "--out"], "fetch: --out needs a value"),
        (&["fetch", "x.torrent", "--frob"], "fetch: unknown flag --frob (see --help)"),
        (&["torrent"], "torrent: missing the subcommand: create, info or magnet (see --help)"),
        (&["torrent", "frob"], "torrent: unknown subcommand \"frob\": create, info or magnet (see --help)"),
        (&["torrent", "create"], "torrent create: missing FILE (see --help)"),
        (
            &["torrent", "create", "f", "--piece-length", "1000"],
            "torrent create: --piece-length \"1000\" is not a power of two from 16 KiB to 64 MiB",
        ),
        (&["torrent", "info"], "torrent info: missing FILE.torrent (see --help)"),
        (&["torrent", "magnet", "a", "b"], "torrent magnet: unexpected argument \"b\" (see --help)"),
    ];
    for (args, message) in cases {
        let (code, out, err) = run(env!("CARGO_BIN_EXE_shardctl"), args);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert_eq!(out, "", "{args:?}");
        assert_eq!(err, format!("shardctl: {message}\n"), "{args:?}");
    }
}

/// Errors that are not usage errors exit 1 with one line saying what failed.
#[test]
fn shardctl_runtime_errors_exit_1() {
    let dir = common::TempDir::new("cli-runtime");
    let missing = dir.path().join("missing.gguf");
    let missing = missing.to_str().unwrap();
    let (code, out, err) = run(env!("CARGO_BIN_EXE_shardctl"), &["generate", missing, "--prompt", "a"]);
    assert_eq!((code, out.as_str()), (Some(1), ""), "{err}");
    assert_eq!(err, format!("shardctl: opening {missing}: No such file or directory (os error 2)\n"));
    // A node that answers an error: its message and code, exit status 1.
    let node = common::NodeProc::start(dir.path(), &[]);
    let (code, _, err) = run(env!("CARGO_BIN_EXE_shardctl"), &["--node", &node.addr, "load", "5"]);
    assert_eq!(code, Some(1), "{err}");
    assert_eq!(err, "shardctl: Shard 5 not found. Torrent download required. (SHARD_NOT_FOUND)\n");
}

/// `--help`: the first line says what shardctl is for (generation first), and every option
/// that has a default shows it.
#[test]
fn shardctl_help_gives_every_default() {
    let (code, out, err) = run(env!("CARGO_BIN_EXE_shardctl"), &["--help"]);
    assert_eq!((code, err.as_str()), (Some(0), ""));
    assert!(out.lines().next().unwrap().contains("generate text"), "{out}");
    assert!(out.contains("torrent magnet"));
    let lines: Vec<&str> = out.lines().collect();
    for flag in [
        "-n N",
        "--temp T",
        "--top-k K",
        "--top-p P",
        "--seed S",
        "--threads N",
        "--ctx N",
        "--batch N",
        "--bootstrap",
        "--cluster NAME",
        "--session",
        "--pace-ms",
        "--load-timeout",
        "--node ADDR",
        "--timeout SECS",
        "--layers N",
        "--type",
        "--listen",
        "--repeat-penalty",
        "--repeat-last-n",
        "--presence-penalty",
        "--frequency-penalty",
        "--system TEXT",
        "--chat-template FILE",
    ] {
        // Where the flag is described (after a space, not inside `[...]`), its default follows,
        // before the next flag on that line, or on the next (wrapped) line.
        let mut described = 0;
        for (i, line) in lines.iter().enumerate() {
            for (at, _) in line.match_indices(flag).filter(|&(at, _)| at > 0 && line.as_bytes()[at - 1] == b' ') {
                let after = &line[at + flag.len()..];
                let own = after.find("  -").map_or(after, |end| &after[..end]);
                let next = lines.get(i + 1).copied().unwrap_or("");
                assert!(own.contains("[default:") || next.contains("[default:"), "{flag} has no default: {line}");
                described += 1;
            }
        }
        assert!(described > 0, "{flag} missing from --help");
    }
    // Each `--batch` (generate: 512, infer: 128) states its own.
    assert!(out.contains("prompt tokens per forward pass [default: 512]") && out.contains("[default: 128]"));
}

/// `list` prints a table whose columns line up whatever the widths of the cells.
#[test]
fn shardctl_list_aligns_its_columns() {
    let dir = common::TempDir::new("cli-list");
    common::write_shard(&dir.path().join("shard-0.gguf"), 0, 12, (0, 1), 10);
    common::write_shard(&dir.path().join("shard-11.gguf"), 11, 12, (110, 120), 300_000);
    std::fs::write(dir.path().join("not-a-model.gguf"), b"junk").unwrap();
    let node = common::NodeProc::start(dir.path(), &[]);
    node.wait_metadata();
    let (code, out, err) = run(env!("CARGO_BIN_EXE_shardctl"), &["--node", &node.addr, "list"]);
    assert_eq!(code, Some(0), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 4, "{out}");
    let header = lines[0];
    let start = |name: &str| header.find(name).unwrap();
    let size_end = start("SIZE") + "SIZE".len();
    for row in &lines[1..] {
        for col in ["LAYERS", "INFO HASH", "FILE"] {
            let at = start(col);
            assert!(row.as_bytes()[at - 1] == b' ' && row.as_bytes()[at] != b' ', "{col} misaligned:\n{out}");
        }
        // Sizes are right-aligned under SIZE.
        assert!(row.as_bytes()[size_end - 1].is_ascii_digit() && row.as_bytes()[size_end] == b' ', "{out}");
    }
}

#[test]
fn shardctl_reports_a_node_that_is_not_there() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let (code, _, err) = run(env!("CARGO_BIN_EXE_shardctl"), &["--node", &free, "--timeout", "2", "status"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("is shard_listener running there?"), "{err}");
}
