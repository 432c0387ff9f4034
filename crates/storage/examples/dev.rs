//! Hand-testing tool for nook-storage.
//!
//!   cargo run --example dev -- build tiny|default ROOT
//!   cargo run --example dev -- overlay tiny|default ROOT OVERLAY [SIZE_BYTES]
//!   cargo run --example dev -- agent-initrd tiny|default ROOT AGENT CACHE_DIR
//!   cargo run --example dev -- show tiny|default ROOT
#![allow(clippy::print_stdout)]

use std::path::Path;
use std::time::Instant;

use nook_storage::{ImageKind, ImageStore, disk, initrd_with_agent};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [cmd, kind, root, rest @ ..] = args.as_slice() else {
        return Err("usage: dev build|overlay|agent-initrd|show KIND ROOT ...".into());
    };
    let kind: ImageKind = kind.parse()?;
    let store = ImageStore::new(root);
    match cmd.as_str() {
        "build" => {
            let started = Instant::now();
            let image = store.build(kind, &mut |e| {
                let t = started.elapsed().as_secs_f64();
                match &e.detail {
                    None => eprintln!("[{t:7.1}s] == {}", e.step),
                    Some(d) => eprintln!("[{t:7.1}s]    {d}"),
                }
            });
            match image {
                Ok(image) => println!(
                    "{image:#?}\nbuilt in {:.1}s",
                    started.elapsed().as_secs_f64()
                ),
                Err(e) => {
                    let mut msg = e.to_string();
                    let mut src = std::error::Error::source(&e);
                    while let Some(s) = src {
                        msg.push_str(&format!(": {s}"));
                        src = s.source();
                    }
                    return Err(msg.into());
                }
            }
        }
        "show" => println!("{:#?}", store.image(kind)?),
        "overlay" => {
            let image = store.image(kind)?;
            let size = match rest.get(1) {
                Some(s) => s.parse()?,
                None => image.default_disk_bytes,
            };
            let overlay = rest.first().ok_or("missing OVERLAY")?;
            disk::create_overlay(&image.rootfs, Path::new(overlay), size)?;
            println!("{overlay}");
        }
        "agent-initrd" => {
            let image = store.image(kind)?;
            let [agent, cache, ..] = rest else {
                return Err("missing AGENT CACHE_DIR".into());
            };
            let started = Instant::now();
            let path = initrd_with_agent(&image, Path::new(agent), Path::new(cache))?;
            println!(
                "{} ({:.3}s)",
                path.display(),
                started.elapsed().as_secs_f64()
            );
        }
        other => return Err(format!("unknown command {other}").into()),
    }
    Ok(())
}
