//! Flag parsing shared by the commands; usage errors exit with status 2.

use std::collections::HashMap;

/// Exit status 2 for usage errors found after parsing.
pub fn usage(msg: String) -> anyhow::Error {
    eprintln!("shardctl: {msg}");
    std::process::exit(2);
}

/// Parses `--flag value` pairs (and bare switches listed in `switches`).
pub fn flag_map<'a>(flags: &[&'a str], valued: &[&str], switches: &[&str]) -> HashMap<&'a str, &'a str> {
    let mut m = std::collections::HashMap::new();
    let mut it = flags.iter();
    while let Some(f) = it.next() {
        if switches.contains(f) {
            m.insert(*f, "");
        } else if valued.contains(f) {
            let v = it.next().unwrap_or_else(|| {
                usage(format!("{f} needs a value"));
                unreachable!()
            });
            m.insert(*f, *v);
        } else {
            usage(format!("unknown flag {f} (see --help)"));
        }
    }
    m
}

pub fn num<T: std::str::FromStr>(flags: &HashMap<&str, &str>, name: &str, default: T) -> T {
    match flags.get(name) {
        None => default,
        Some(v) => v.parse().unwrap_or_else(|_| {
            usage(format!("{name} {v:?} is not a number"));
            unreachable!()
        }),
    }
}
