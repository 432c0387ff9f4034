use super::*;

/// A handler whose only VM is an echo server on this machine, named "vm1".
struct Echo {
    addr: SocketAddr,
}

impl Handler for Echo {
    async fn connect(&self, vm_id: &str, port: u16) -> Result<TcpStream, String> {
        if vm_id != "vm1" {
            return Err(format!("VM {vm_id} does not run here"));
        }
        assert_eq!(port, self.addr.port());
        TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())
    }

    /// A "process" that upper-cases its input and exits 7 at end of input ("vm1"), or that
    /// exits 3 at once without reading any ("quick").
    async fn shell(&self, vm_id: &str, shell: ShellRequest) -> Result<ShellSession, String> {
        if vm_id == "quick" {
            let (input, input_rx) = tokio::sync::mpsc::channel(1);
            let (output_tx, output) = tokio::sync::mpsc::channel(4);
            drop(input_rx);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = output_tx
                    .send(ShellOut::Exit {
                        code: Some(3),
                        signal: None,
                    })
                    .await;
            });
            return Ok(ShellSession { input, output });
        }
        if vm_id != "vm1" {
            return Err(format!("VM {vm_id} does not run here"));
        }
        let (input, mut input_rx) = tokio::sync::mpsc::channel(4);
        let (output_tx, output) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let banner = format!("{:?} {:?}\n", shell.command, shell.pty.map(|p| p.cols));
            let _ = output_tx.send(ShellOut::Stderr(banner.into_bytes())).await;
            while let Some(msg) = input_rx.recv().await {
                match msg {
                    ShellIn::Data(data) => {
                        let _ = output_tx
                            .send(ShellOut::Stdout(data.to_ascii_uppercase()))
                            .await;
                    }
                    ShellIn::Eof => break,
                    _ => {}
                }
            }
            let _ = output_tx
                .send(ShellOut::Exit {
                    code: Some(7),
                    signal: None,
                })
                .await;
        });
        Ok(ShellSession { input, output })
    }

    /// Prints its argv and stdin's length, then fails with exit 1.
    async fn lobby(&self, request: LobbyRequest, out: tokio::sync::mpsc::Sender<LobbyOut>) {
        let said = format!("{:?} {:?}\n", request.argv, request.stdin.map(|s| s.len()));
        let _ = out.send(LobbyOut::Out(said.into_bytes())).await;
        let _ = out
            .send(LobbyOut::Step {
                step: "thinking".into(),
                json: false,
            })
            .await;
        let _ = out.send(LobbyOut::Exit(1)).await;
    }

    /// Wants layer "b" of the offer, and answers `Done` with a digest of what came: the
    /// lengths and first bytes of each file, so the test sees every byte arrived in order.
    async fn take_vm(&self, peer: Peer, vm_id: &str, live: bool, mut link: MoveLink<PeerStream>) {
        assert!(peer.is("h1") && !peer.is("h2"), "the peer is h1, proven");
        let Ok(Some(MoveIn::Offer(offer))) = link.recv::<MoveIn>().await else {
            return;
        };
        let want = MoveOut::Want {
            image: false,
            layers: offer
                .layers
                .iter()
                .map(|l| l.0.clone())
                .filter(|l| l == "b")
                .collect(),
        };
        if link.send(&want).await.is_err() {
            return;
        }
        let mut got = format!("{vm_id} {live}");
        loop {
            match link.recv::<MoveIn>().await {
                Ok(Some(MoveIn::File { name, size })) => {
                    let mut body = Vec::new();
                    if link.recv_file(size, &mut body).await.is_err() {
                        return;
                    }
                    got += &format!(
                        " {name}:{}:{}",
                        body.len(),
                        body.first().copied().unwrap_or(0)
                    );
                }
                Ok(Some(MoveIn::Commit)) => {
                    let _ = link.send(&MoveOut::Failed { why: got }).await;
                    return;
                }
                _ => return,
            }
        }
    }

    async fn join(&self, request: JoinRequest) -> Result<JoinGrant, String> {
        if secret_digest(&request.secret) != secret_digest(&[9; 32]) {
            return Err("no such invitation".into());
        }
        Ok(JoinGrant {
            store: format!("postgres://for-{}", request.host_name),
            secrets_key: vec![1; 32],
        })
    }

    async fn take_replica(&self, peer: Peer, vm_id: &str, link: MoveLink<PeerStream>) {
        self.take_vm(peer, vm_id, false, link).await;
    }

    async fn memory(&self, vm_id: &str, token: &str, _stream: PeerStream) -> Result<(), String> {
        Err(format!("no move of {vm_id} waits for {token}"))
    }
}

async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = conn.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// Host "h2" serving on a fresh port; returns its channel address and the echo VM's port.
async fn host_h2(ca: &FleetCa) -> (String, u16) {
    let vm = echo_server().await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let identity = ca.issue("h2").expect("issue");
    tokio::spawn(serve(listener, identity, Arc::new(Echo { addr: vm })));
    (addr, vm.port())
}

#[tokio::test]
async fn a_host_reaches_a_vm_through_another_and_bytes_flow_both_ways() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, port) = host_h2(&ca).await;
    // The CA as the store keeps it works the same.
    let ca = FleetCa::from_pem(&ca.to_pem()).expect("from pem");
    let h1 = ca.issue("h1").expect("issue");
    let mut stream = connect(&h1, "h2", &addr, "vm1", port)
        .await
        .expect("connect");
    stream
        .write_all(b"hello through h2\n")
        .await
        .expect("write");
    let mut back = vec![0; 17];
    stream.read_exact(&mut back).await.expect("read");
    assert_eq!(back, b"hello through h2\n");

    match connect(&h1, "h2", &addr, "vm9", port).await {
        Err(ChannelError::Refused { host, why }) => {
            assert_eq!(host, "h2");
            assert!(why.contains("vm9"), "{why}");
        }
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
}

#[tokio::test]
async fn a_moving_vm_sends_only_the_files_asked_for_and_each_arrives_whole() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, _) = host_h2(&ca).await;
    let h1 = ca.issue("h1").expect("issue");
    let mut link = start_move(&h1, "h2", &addr, "vm1", false)
        .await
        .expect("start");
    link.send(&MoveIn::Offer(MoveOffer {
        image: "tiny-1".into(),
        image_files: vec![],
        layers: vec![("a".into(), 1), ("b".into(), 300_000)],
        vm_files: vec![],
        top: 5,
    }))
    .await
    .expect("offer");
    let want: MoveOut = link.recv().await.expect("want").expect("an answer");
    assert_eq!(
        want,
        MoveOut::Want {
            image: false,
            layers: vec!["b".into()]
        }
    );
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, size, byte) in [("layer/b", 300_000usize, 7u8), ("top", 5, 9)] {
        let path = dir.path().join("f");
        std::fs::write(&path, vec![byte; size]).expect("write");
        let mut file = tokio::fs::File::open(&path).await.expect("open");
        link.send_file(name, &mut file, size as u64)
            .await
            .expect("send");
    }
    link.send(&MoveIn::Commit).await.expect("commit");
    let done: MoveOut = link.recv().await.expect("done").expect("an answer");
    assert_eq!(
        done,
        MoveOut::Failed {
            why: "vm1 false layer/b:300000:7 top:5:9".into()
        }
    );

    let refused = memory(&h1, "h2", &addr, "vm1", "t0k").await;
    let mut stream = refused.expect("the memory request is taken before the handler decides");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn a_shell_on_another_host_takes_input_and_gives_output_and_its_exit() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, _) = host_h2(&ca).await;
    let h1 = ca.issue("h1").expect("issue");
    let request = ShellRequest {
        command: Some("tr a-z A-Z".into()),
        env: vec![("LANG".into(), "C".into())],
        pty: Some(ShellPty {
            term: "xterm".into(),
            cols: 120,
            rows: 40,
        }),
    };
    let mut session = shell(&h1, "h2", &addr, "vm1", request.clone())
        .await
        .expect("shell");
    let big = vec![b'x'; 200 << 10];
    session
        .input
        .send(ShellIn::Data(b"hi\n".to_vec()))
        .await
        .expect("send");
    for chunk in big.chunks(CHUNK) {
        session
            .input
            .send(ShellIn::Data(chunk.to_vec()))
            .await
            .expect("send");
    }
    session.input.send(ShellIn::Eof).await.expect("send");
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let exit = loop {
        match session.output.recv().await.expect("output before exit") {
            ShellOut::Stdout(d) => stdout.extend(d),
            ShellOut::Stderr(d) => stderr.extend(d),
            ShellOut::Exit { code, .. } => break code,
        }
    };
    assert_eq!(exit, Some(7));
    assert_eq!(
        String::from_utf8_lossy(&stderr),
        "Some(\"tr a-z A-Z\") Some(120)\n"
    );
    assert_eq!(&stdout[..3], b"HI\n");
    assert_eq!(stdout.len(), 3 + big.len());

    assert!(matches!(
        shell(&h1, "h2", &addr, "vm9", request).await,
        Err(ChannelError::Refused { .. })
    ));
}

#[tokio::test]
async fn a_lobby_command_runs_on_the_other_host_and_its_output_comes_back() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, _) = host_h2(&ca).await;
    let h1 = ca.issue("h1").expect("issue");
    let request = LobbyRequest {
        account_id: Some("a1".into()),
        admin: false,
        key_openssh: "ssh-ed25519 AAAA".into(),
        fingerprint: "SHA256:x".into(),
        peer: None,
        tty: false,
        argv: vec!["start".into(), "vm1".into()],
        stdin: Some(vec![7; 1 << 20]),
    };
    let mut output = lobby(&h1, "h2", &addr, request).await.expect("lobby");
    let mut seen = Vec::new();
    while let Some(out) = output.recv().await {
        seen.push(out);
    }
    assert_eq!(
        seen,
        vec![
            LobbyOut::Out(b"[\"start\", \"vm1\"] Some(1048576)\n".to_vec()),
            LobbyOut::Step {
                step: "thinking".into(),
                json: false
            },
            LobbyOut::Exit(1),
        ]
    );
}

#[tokio::test]
async fn the_exit_status_comes_back_even_when_the_process_took_no_input() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, _) = host_h2(&ca).await;
    let h1 = ca.issue("h1").expect("issue");
    let request = ShellRequest {
        command: Some("exit 3".into()),
        env: Vec::new(),
        pty: None,
    };
    let mut session = shell(&h1, "h2", &addr, "quick", request)
        .await
        .expect("shell");
    let input = session.input.clone();
    tokio::spawn(async move {
        for _ in 0..64 {
            if input.send(ShellIn::Data(vec![b'y'; CHUNK])).await.is_err() {
                return;
            }
        }
    });
    let exit = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(out) = session.output.recv().await {
            if let ShellOut::Exit { code, .. } = out {
                return code;
            }
        }
        None
    })
    .await
    .expect("an answer in time");
    assert_eq!(exit, Some(3));
}

#[tokio::test]
async fn only_hosts_of_the_fleet_get_in_and_only_the_named_host_is_trusted() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, port) = host_h2(&ca).await;

    // A certificate from another CA: the handshake fails, and nothing reaches the VM.
    let stranger = FleetCa::generate().expect("ca").issue("h1").expect("issue");
    assert!(matches!(
        connect(&stranger, "h2", &addr, "vm1", port).await,
        Err(ChannelError::Unreachable { .. } | ChannelError::Protocol { .. })
    ));

    // A fleet host dialling "h3" gets h2's certificate: refused.
    let h1 = ca.issue("h1").expect("issue");
    assert!(matches!(
        connect(&h1, "h3", &addr, "vm1", port).await,
        Err(ChannelError::Unreachable { .. })
    ));

    // No client certificate at all: TLS alone is not enough.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("pem"))
            .expect("root");
        roots
    };
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(&addr).await.expect("tcp");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(anonymous));
    let outcome = async {
        let mut tls = connector
            .connect(ServerName::try_from("h2").expect("name"), tcp)
            .await?;
        tls.write_all(b"{\"connect\":{\"vm_id\":\"vm1\",\"port\":1}}\n")
            .await?;
        let mut buf = [0u8; 1];
        let n = tls.read(&mut buf).await?;
        Ok::<usize, std::io::Error>(n)
    }
    .await;
    assert!(
        !matches!(outcome, Ok(n) if n > 0),
        "an anonymous client got an answer"
    );
}

#[tokio::test]
async fn an_endless_request_line_is_cut_off() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, _) = host_h2(&ca).await;
    let h1 = ca.issue("h1").expect("issue");
    let tcp = TcpStream::connect(&addr).await.expect("tcp");
    let connector = tokio_rustls::TlsConnector::from(h1.client.clone());
    let mut tls = connector
        .connect(ServerName::try_from("h2").expect("name"), tcp)
        .await
        .expect("handshake");
    let junk = vec![b'x'; MAX_REQUEST * 4];
    let _ = tls.write_all(&junk).await;
    let mut buf = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the host kept reading an endless line");
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
}

#[test]
fn addresses_get_the_default_port_only_when_they_name_none() {
    assert_eq!(with_port("10.0.0.1"), format!("10.0.0.1:{DEFAULT_PORT}"));
    assert_eq!(with_port("h1.example.com:9000"), "h1.example.com:9000");
    assert_eq!(with_port("h1"), format!("h1:{DEFAULT_PORT}"));
    assert_eq!(with_port("[::1]:9000"), "[::1]:9000");
    assert_eq!(with_port("fe80::1"), format!("[fe80::1]:{DEFAULT_PORT}"));
    assert_eq!(
        with_port("2001:db8:0:0:0:0:0:1"),
        format!("[2001:db8::1]:{DEFAULT_PORT}")
    );
}

#[test]
fn a_ca_without_its_key_is_refused() {
    let ca = FleetCa::generate().expect("ca");
    assert!(FleetCa::from_pem(&ca.cert_pem).is_err());
    assert!(FleetCa::from_pem("nonsense").is_err());
}

/// A new host holding only a token gets the grant from the host it names, and only from it.
#[tokio::test]
async fn a_token_joins_through_the_host_it_names_and_nothing_else() {
    let ca = FleetCa::generate().expect("ca");
    let (addr, _) = host_h2(&ca).await;
    let pin = ca.issue("h1").expect("issue").ca_sha256();
    let token = |host: &str, pin: [u8; 32], secret: [u8; 32]| JoinToken {
        host: host.into(),
        addr: addr.clone(),
        ca_sha256: pin,
        secret,
    };
    let grant = join(&token("h2", pin, [9; 32]), "h4").await.expect("join");
    assert_eq!(grant.store, "postgres://for-h4");
    assert_eq!(grant.secrets_key, vec![1; 32]);

    match join(&token("h2", pin, [8; 32]), "h4").await {
        Err(ChannelError::Refused { why, .. }) => {
            assert!(why.contains("no such invitation"), "{why}")
        }
        other => panic!("a wrong secret joined: {other:?}"),
    }
    // Another fleet's CA, or a host other than the one named: the secret never goes.
    let err = join(&token("h2", [0; 32], [9; 32]), "h4")
        .await
        .expect_err("other CA");
    assert!(err.to_string().contains("CA differs"), "{err}");
    let err = join(&token("h3", pin, [9; 32]), "h4")
        .await
        .expect_err("other host");
    assert!(matches!(err, ChannelError::Unreachable { .. }), "{err}");

    // A joining connection gets nothing else: it cannot ask for a VM.
    let stranger = FleetCa::generate().expect("ca").issue("h1").expect("issue");
    assert!(connect(&stranger, "h2", &addr, "vm1", 1).await.is_err());
}
