//! Flag parsing shared by the commands; usage errors exit with status 2.

use std::collections::HashMap;

/// Exit status 2 for usage errors found after parsing.
pub fn usage(msg: String) -> anyhow::Error {
    eprintln!("shardctl: {msg}");
    std::process::exit(2);
}

/// The first of `rest`, a positional argument (`what`, named in the error), and what follows it.
/// A flag in its place (`generate --prompt ...`) counts as missing.
pub fn positional<'a, 'b>(cmd: &str, what: &str, rest: &'b [&'a str]) -> (&'a str, &'b [&'a str]) {
    match rest.split_first() {
        Some((first, tail)) if !first.starts_with('-') || first.len() == 1 => (first, tail),
        _ => {
            usage(format!("{cmd}: missing {what} (see --help)"));
            unreachable!()
        }
    }
}

/// Refuses arguments after a command's last one.
pub fn no_more(cmd: &str, rest: &[&str]) {
    if let Some(extra) = rest.first() {
        usage(format!("{cmd}: unexpected argument {extra:?} (see --help)"));
    }
}

/// A command's `--flag value` pairs and bare switches, parsed once; every
/// error names the command and the flag, and exits with status 2.
pub struct Flags<'a> {
    cmd: &'a str,
    map: HashMap<&'a str, &'a str>,
}

impl<'a> Flags<'a> {
    /// `valued` flags take the next argument as their value; `switches` take none. Anything
    /// else (an unknown flag, a stray word, a repeated flag) is a usage error.
    pub fn parse(cmd: &'a str, flags: &[&'a str], valued: &[&str], switches: &[&str]) -> Flags<'a> {
        let mut map = HashMap::new();
        let mut it = flags.iter();
        while let Some(&f) = it.next() {
            let value = if switches.contains(&f) {
                ""
            } else if valued.contains(&f) {
                match it.next() {
                    Some(v) => v,
                    None => {
                        usage(format!("{cmd}: {f} needs a value"));
                        unreachable!()
                    }
                }
            } else if f.starts_with('-') {
                usage(format!("{cmd}: unknown flag {f} (see --help)"));
                unreachable!()
            } else {
                usage(format!("{cmd}: unexpected argument {f:?} (see --help)"));
                unreachable!()
            };
            if map.insert(f, value).is_some() {
                usage(format!("{cmd}: {f} given twice"));
            }
        }
        Flags { cmd, map }
    }

    pub fn get(&self, name: &str) -> Option<&'a str> {
        self.map.get(name).copied()
    }

    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The flag's value parsed as a number, or `default` when it is absent.
    pub fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> T {
        match self.map.get(name) {
            None => default,
            Some(v) => v.parse().unwrap_or_else(|_| {
                self.usage(format!("{name} {v:?} is not a number"));
                unreachable!()
            }),
        }
    }

    /// A usage error of this command: printed as `shardctl: CMD: MSG`, exit status 2.
    pub fn usage(&self, msg: String) -> anyhow::Error {
        usage(format!("{}: {msg}", self.cmd))
    }
}
