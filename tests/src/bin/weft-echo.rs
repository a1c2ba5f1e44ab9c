//! `weft-echo`: the small real programs the e2e scenarios run inside their
//! namespaces.
//!
//! ```text
//! weft-echo serve [--echo ADDR] [--http ADDR] [--h2 ADDR] [--name NAME] [--marker STR]
//!                 [--sink ADDR [--stall-until-file PATH]]  # see servers::serve_sink
//!                 [--greet ADDR]                            # server-first: greets, then echoes
//! weft-echo client ADDR [--bytes N] [--marker STR]     # echo round trip, exit 0 if intact
//! weft-echo http-get ADDR [PATH]                        # prints status and body, exit 0 on 2xx
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_e2e::{client, http, servers};

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("weft-echo: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Takes the value following `--name` out of `args`.
fn option(args: &mut Vec<String>, name: &str) -> Result<Option<String>> {
    let Some(at) = args.iter().position(|a| a == name) else {
        return Ok(None);
    };
    if at + 1 >= args.len() {
        bail!("{name} needs a value");
    }
    let value = args.remove(at + 1);
    args.remove(at);
    Ok(Some(value))
}

fn addr(text: &str) -> Result<SocketAddr> {
    text.parse()
        .with_context(|| format!("{text:?} is not ip:port"))
}

fn run(mut args: Vec<String>) -> Result<ExitCode> {
    if args.is_empty() {
        bail!("usage: weft-echo serve|client|http-get ...");
    }
    let cmd = args.remove(0);
    match cmd.as_str() {
        "serve" => {
            let echo = option(&mut args, "--echo")?;
            let http_addr = option(&mut args, "--http")?;
            let h2_addr = option(&mut args, "--h2")?;
            let name = option(&mut args, "--name")?.unwrap_or_else(|| "weft-echo".into());
            let marker = option(&mut args, "--marker")?.unwrap_or_default();
            let sink = option(&mut args, "--sink")?;
            let stall = option(&mut args, "--stall-until-file")?.map(PathBuf::from);
            let greet = option(&mut args, "--greet")?;
            if echo.is_none()
                && http_addr.is_none()
                && h2_addr.is_none()
                && sink.is_none()
                && greet.is_none()
            {
                bail!("serve needs --echo ADDR, --http ADDR, --h2 ADDR, --sink ADDR and/or --greet ADDR");
            }
            if stall.is_some() && sink.is_none() {
                bail!("--stall-until-file applies to --sink");
            }
            let mut threads = Vec::new();
            if let Some(a) = sink {
                let listener = servers::bind(addr(&a)?)?;
                threads.push(std::thread::spawn(move || {
                    servers::serve_sink(listener, stall)
                }));
            }
            if let Some(a) = greet {
                let listener = servers::bind(addr(&a)?)?;
                let greeting = format!("220 {name} ready marker={marker}\r\n");
                threads.push(std::thread::spawn(move || {
                    servers::serve_greeting(listener, greeting)
                }));
            }
            if let Some(a) = echo {
                let listener = servers::bind(addr(&a)?)?;
                let marker = marker.clone();
                threads.push(std::thread::spawn(move || {
                    if marker.is_empty() {
                        servers::serve_echo(listener)
                    } else {
                        servers::serve_echo_marked(listener, marker)
                    }
                }));
            }
            if let Some(a) = h2_addr {
                let a = addr(&a)?;
                let marker = marker.clone();
                threads.push(std::thread::spawn(move || {
                    if let Err(e) = weft_e2e::h2app::serve(a, marker) {
                        eprintln!("weft-echo: HTTP/2 server: {e:#}");
                    }
                }));
            }
            if let Some(a) = http_addr {
                let listener = servers::bind(addr(&a)?)?;
                let who = servers::HttpIdentity { name, marker };
                threads.push(std::thread::spawn(move || {
                    servers::serve_http(listener, who)
                }));
            }
            println!("ready");
            for t in threads {
                let _ = t.join();
            }
            Ok(ExitCode::SUCCESS)
        }
        "client" => {
            let bytes: usize = option(&mut args, "--bytes")?.map_or(Ok(1024), |b| b.parse())?;
            let marker = option(&mut args, "--marker")?.unwrap_or_else(|| "weft-echo".into());
            let target = addr(args.first().context("client needs ADDR")?)?;
            let data = client::payload(&marker, bytes);
            client::echo_roundtrip(target, &data, Duration::from_secs(30))?;
            println!("ok: {bytes} bytes echoed intact by {target}");
            Ok(ExitCode::SUCCESS)
        }
        "http-get" => {
            let target = addr(args.first().context("http-get needs ADDR")?)?;
            let path = args.get(1).map_or("/", String::as_str);
            let resp = http::get(target, path, Duration::from_secs(10))?;
            println!("{}\n{}", resp.status, resp.text());
            Ok(if (200..300).contains(&resp.status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        other => bail!("unknown command {other:?}: use serve, client or http-get"),
    }
}
