//! `--port`/`--console` arguments: where a port's host side is, and its name.

use std::path::PathBuf;
use std::str::FromStr;

/// Longest port name.
pub const MAX_NAME_LEN: usize = crate::request::MAX_NAME_LEN;

/// Where a port's host side is, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostSpec {
    /// A unix socket server at this path (plus `PATH.ctl` for resize commands).
    Socket(PathBuf),
    /// A new pty; its path is printed and written to a file.
    Pty,
    /// Output appended to this file; no input.
    File(PathBuf),
    /// The daemon's stdin and stdout.
    Stdio,
}

/// One `--console` or `--port` argument.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct PortSpec {
    /// Port name sent to the guest (PORT_NAME); named ports only.
    pub name: Option<String>,
    /// Host side; `None` means a socket beside the vhost-user socket.
    pub host: Option<HostSpec>,
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(format!("port name must be 1 to {MAX_NAME_LEN} bytes"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b',' && b != b'=')
    {
        return Err("port name must be printable ASCII without ',' or '='".into());
    }
    Ok(())
}

impl FromStr for PortSpec {
    type Err = String;

    /// `name=NAME,socket=PATH|pty|file=PATH|stdio`, every part optional.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut spec = PortSpec::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (key, value) = match part.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (part, None),
            };
            let host = match (key, value) {
                ("name", Some(v)) => {
                    check_name(v)?;
                    spec.name = Some(v.to_string());
                    continue;
                }
                ("socket", Some(v)) if !v.is_empty() => HostSpec::Socket(PathBuf::from(v)),
                ("file", Some(v)) if !v.is_empty() => HostSpec::File(PathBuf::from(v)),
                ("pty", None) => HostSpec::Pty,
                ("stdio", None) => HostSpec::Stdio,
                _ => {
                    return Err(format!(
                        "unknown `{part}`: expected name=NAME, socket=PATH, pty, file=PATH or stdio"
                    ));
                }
            };
            if spec.host.replace(host).is_some() {
                return Err("give one of socket=, pty, file= or stdio".into());
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_port_specs() {
        let s: PortSpec = "name=org.example.log,socket=/tmp/x".parse().unwrap();
        assert_eq!(s.name.as_deref(), Some("org.example.log"));
        assert_eq!(s.host, Some(HostSpec::Socket("/tmp/x".into())));
        assert_eq!("pty".parse::<PortSpec>().unwrap().host, Some(HostSpec::Pty));
        assert_eq!(
            "stdio".parse::<PortSpec>().unwrap().host,
            Some(HostSpec::Stdio)
        );
        assert!("pty,stdio".parse::<PortSpec>().is_err());
        assert!("name=a b".parse::<PortSpec>().is_err());
        assert!("bogus=1".parse::<PortSpec>().is_err());
    }
}
