//! Properties of the frame parser, which reads whatever a guest (or a host) puts on the port:
//! it must never panic, must give back exactly what was encoded however the bytes are cut, and
//! must find the next frame after noise, while keeping its memory bounded.

use std::time::{Duration, Instant};

use nook_proto::{
    FrameBuf, GuestFrame, GuestMsg, HostFrame, HostMsg, MAX_FRAME, PROTOCOL_VERSION, Stream,
    decode, encode,
};
use proptest::prelude::*;

/// Feeds `wire` in pieces of the given sizes (cycled), collecting every body yielded.
fn feed(fb: &mut FrameBuf, wire: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut cut = cuts.iter().cycle();
    while at < wire.len() {
        let n = cut
            .next()
            .copied()
            .unwrap_or(wire.len())
            .clamp(1, wire.len() - at);
        fb.push(&wire[at..at + n]);
        at += n;
        while let Some(body) = fb.next_body() {
            out.push(body);
        }
    }
    out
}

fn host_msg() -> impl Strategy<Value = HostMsg> {
    prop_oneof![
        any::<u32>().prop_map(|version| HostMsg::Hello { version }),
        proptest::collection::vec(any::<u8>(), 0..2048).prop_map(|data| HostMsg::Stdin { data }),
        Just(HostMsg::CloseStdin),
        (any::<u16>(), any::<u16>()).prop_map(|(cols, rows)| HostMsg::Resize { cols, rows }),
        any::<i32>().prop_map(|signal| HostMsg::Signal { signal }),
        any::<u64>().prop_map(|bytes| HostMsg::OutputAck { bytes }),
        (".*", any::<u64>(), any::<u32>()).prop_map(|(path, offset, len)| HostMsg::ReadFile {
            path,
            offset,
            len
        }),
        (
            ".*",
            proptest::collection::vec(any::<u8>(), 0..2048),
            any::<bool>(),
            proptest::option::of(any::<u32>())
        )
            .prop_map(|(path, data, append, mode)| HostMsg::WriteFile {
                path,
                data,
                append,
                mode
            }),
        Just(HostMsg::Metrics),
        any::<bool>().prop_map(|reboot| HostMsg::Shutdown { reboot }),
    ]
}

fn guest_msg() -> impl Strategy<Value = GuestMsg> {
    prop_oneof![
        (any::<u32>(), ".*", ".*", ".*").prop_map(|(version, agent_version, hostname, boot_id)| {
            GuestMsg::Hello {
                version,
                agent_version,
                hostname,
                boot_id,
            }
        }),
        any::<u32>().prop_map(|pid| GuestMsg::Spawned { pid }),
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..2048)
        )
            .prop_map(|(err, data)| GuestMsg::Output {
                stream: if err { Stream::Stderr } else { Stream::Stdout },
                data,
            }),
        any::<u64>().prop_map(|bytes| GuestMsg::StdinAck { bytes }),
        (
            proptest::option::of(any::<i32>()),
            proptest::option::of(any::<i32>())
        )
            .prop_map(|(code, signal)| GuestMsg::Exit { code, signal }),
        Just(GuestMsg::Ok),
    ]
}

/// Noise that holds no complete magic, but plenty of its letters.
fn noise() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![Just(b'N'), Just(b'O'), Just(b'K'), any::<u8>()],
        0..64,
    )
    .prop_filter("no complete magic", |g| !g.windows(4).any(|w| w == b"NOOK"))
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(
        wire in proptest::collection::vec(
            prop_oneof![Just(b'N'), Just(b'O'), Just(b'K'), any::<u8>()], 0..4096),
        cuts in proptest::collection::vec(1usize..300, 1..8),
    ) {
        let mut fb = FrameBuf::new();
        for body in feed(&mut fb, &wire, &cuts) {
            // Whatever came out was inside what went in.
            prop_assert!(body.len() <= wire.len());
            let _ = decode::<GuestFrame>(&body);
        }
        prop_assert!(fb.buffered() <= wire.len());
        prop_assert!(fb.skipped() <= wire.len() as u64);
    }

    #[test]
    fn host_frames_roundtrip_however_they_are_cut(
        frames in proptest::collection::vec(
            (any::<u64>(), host_msg()).prop_map(|(id, msg)| HostFrame { id, msg }), 0..8),
        cuts in proptest::collection::vec(1usize..5000, 1..8),
    ) {
        let wire: Vec<u8> = frames.iter().flat_map(|f| encode(f).expect("encode")).collect();
        let mut fb = FrameBuf::new();
        let got: Vec<HostFrame> = feed(&mut fb, &wire, &cuts)
            .iter()
            .map(|b| decode(b).expect("decode"))
            .collect();
        prop_assert_eq!(got, frames);
        prop_assert_eq!(fb.skipped(), 0);
        prop_assert_eq!(fb.buffered(), 0);
    }

    #[test]
    fn noise_between_frames_is_skipped(
        parts in proptest::collection::vec(
            (noise(), any::<u64>(), guest_msg()), 1..8),
        tail in noise(),
        cuts in proptest::collection::vec(1usize..200, 1..8),
    ) {
        let mut wire = Vec::new();
        let mut frames = Vec::new();
        let mut noise_len = tail.len() as u64;
        for (garbage, id, msg) in parts {
            noise_len += garbage.len() as u64;
            wire.extend_from_slice(&garbage);
            let frame = GuestFrame { id, msg };
            wire.extend(encode(&frame).expect("encode"));
            frames.push(frame);
        }
        wire.extend_from_slice(&tail);
        let mut fb = FrameBuf::new();
        let got: Vec<GuestFrame> = feed(&mut fb, &wire, &cuts)
            .iter()
            .map(|b| decode(b).expect("decode"))
            .collect();
        prop_assert_eq!(got, frames);
        // The noise at the very end may still be held as a possible start of a frame.
        prop_assert!(fb.skipped() + fb.buffered() as u64 == noise_len);
    }
}

/// A guest sending headers that announce too large a body, back to back, used to cost a move
/// of the whole buffer per skipped byte: quadratic, minutes of CPU for a few MiB. Skipping
/// with a cursor is linear; the bound below is a thousand times what that takes.
#[test]
fn bad_headers_at_full_speed_are_skipped_in_linear_time() {
    let mut bad = Vec::new();
    while bad.len() < 4 << 20 {
        bad.extend_from_slice(b"NOOK\xff\xff\xff\xff");
    }
    let frame = HostFrame {
        id: 9,
        msg: HostMsg::Hello {
            version: PROTOCOL_VERSION,
        },
    };
    bad.extend(encode(&frame).expect("encode"));
    let started = Instant::now();
    let mut fb = FrameBuf::new();
    // One push, as a reader with a large buffer would make after falling behind.
    let got = feed(&mut fb, &bad, &[bad.len()]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(got.len(), 1);
    assert_eq!(decode::<HostFrame>(&got[0]).expect("decode"), frame);
    assert_eq!(fb.skipped(), 4 << 20);
}

/// A header that announces the largest allowed body holds at most that much, and what follows
/// a frame that never decodes is still found.
#[test]
fn memory_is_bounded_by_one_frame() {
    let mut fb = FrameBuf::new();
    let mut header = b"NOOK".to_vec();
    header.extend_from_slice(&(MAX_FRAME as u32).to_be_bytes());
    fb.push(&header);
    let junk = vec![b'x'; 64 * 1024];
    let mut yielded = 0;
    for _ in 0..(MAX_FRAME / junk.len()) * 3 {
        fb.push(&junk);
        while fb.next_body().is_some() {
            yielded += 1;
        }
        assert!(fb.buffered() <= MAX_FRAME + 8 + junk.len());
    }
    assert_eq!(
        yielded, 1,
        "the announced body is yielded once, then skipped"
    );
    let frame = GuestFrame {
        id: 1,
        msg: GuestMsg::Ok,
    };
    let got = feed(&mut fb, &encode(&frame).expect("encode"), &[3]);
    assert_eq!(decode::<GuestFrame>(&got[0]).expect("decode"), frame);
}
