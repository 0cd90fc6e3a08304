//! TLS on the client port (`-Z`, `-o ssl_*`, `refresh_certs`, SIGHUP),
//! against the real binary with real TLS clients (rustls here, pymemcache
//! over Python's ssl module), and the bad input the security issue lists:
//! plaintext on a TLS port, TLS on a plaintext port, stalled handshakes,
//! expired and wrong-CA certificates, a flood of failed handshakes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::hostile::{stats, wait_for};
use common::tls::{Ca, Files, client_config, connect, write};
use common::{Client, Memcached, Server, stat_value};

fn start(files: &Files, more_o: &str, extra: &[&str]) -> Server {
    let mut args = files.server_args(more_o);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(&args)
}

/// A TLS client of `server` trusting the test CA, with no certificate.
fn tls_client(server: &Server, files: &Files) -> Client {
    connect(
        server.addr(),
        client_config(&files.ca.pem, None, false),
        "localhost",
    )
    .unwrap_or_else(|e| panic!("TLS handshake: {e}\n{}", server.stderr_text()))
}

/// Whether a TLS session with `config` is served: the handshake completes
/// and `version` is answered. A TLS 1.3 server refuses a client
/// certificate after the client has finished its side, so a refusal can
/// show only at the first exchange.
fn served(server: &Server, config: std::sync::Arc<rustls::ClientConfig>) -> bool {
    match connect(server.addr(), config, "localhost") {
        Ok(mut c) => c
            .call(b"version\r\n", Duration::from_secs(5))
            .is_ok_and(|r| r.starts_with(b"VERSION ")),
        Err(_) => false,
    }
}

/// The whole text protocol works through TLS, and `stats` and
/// `stats settings` report TLS as memcached does.
#[test]
fn a_tls_port_serves_the_protocol_and_reports_its_settings() {
    let files = Files::new("serve");
    let server = start(&files, "", &[]);
    let mut c = tls_client(&server, &files);
    assert_eq!(c.ask(b"set k 5 0 3\r\nabc\r\n"), "STORED\r\n");
    assert_eq!(c.ask(b"get k\r\n"), "VALUE k 5 3\r\nabc\r\nEND\r\n");
    assert_eq!(c.ask(b"incr n 1\r\n"), "NOT_FOUND\r\n");
    // A reply far larger than a TLS record and than ssl_wbuf_size.
    let big = vec![b'x'; 600 * 1024];
    let mut set = format!("set big 0 0 {}\r\n", big.len()).into_bytes();
    set.extend_from_slice(&big);
    set.extend_from_slice(b"\r\n");
    assert_eq!(c.ask(&set), "STORED\r\n");
    let reply = c.request(b"get big big big\r\n", &[b"END\r\n"]);
    assert_eq!(
        reply.len(),
        3 * (big.len() + "VALUE big 0 614400\r\n\r\n".len()) + 5
    );
    let settings = stats(&mut c, "settings");
    for line in [
        "STAT ssl_enabled yes".to_string(),
        format!("STAT ssl_chain_cert {}", files.path("server.pem")),
        format!("STAT ssl_key {}", files.path("server.key")),
        "STAT ssl_verify_mode 0".into(),
        "STAT ssl_ca_cert NULL".into(),
        "STAT ssl_wbuf_size 16384".into(),
        "STAT ssl_session_cache no".into(),
        "STAT ssl_min_version tlsv1.2".into(),
    ] {
        assert!(
            settings.contains(&format!("{line}\r\n")),
            "{line} not in:\n{settings}"
        );
    }
    let general = stats(&mut c, "");
    assert_eq!(stat_value(&general, "ssl_handshake_errors"), 0);
    assert!(general.contains("STAT time_since_server_cert_refresh "));
    assert!(
        !general.contains("ssl_new_sessions"),
        "only with ssl_session_cache"
    );
}

/// Plaintext on a TLS port: the handshake fails, the connection is closed
/// without a memcached reply, nothing is stored, the failure is counted
/// and TLS clients are served as before.
#[test]
fn plaintext_on_a_tls_port_is_closed_and_stores_nothing() {
    let files = Files::new("plaintext");
    let server = start(&files, "", &[]);
    let mut plain = TcpStream::connect(server.addr()).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    plain.write_all(b"set k 0 0 1\r\nx\r\n").expect("send");
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        !got.windows(6).any(|w| w == b"STORED"),
        "a plaintext request was served: {got:?}"
    );
    let mut c = tls_client(&server, &files);
    assert_eq!(c.ask(b"get k\r\n"), "END\r\n");
    assert_eq!(stat_value(&stats(&mut c, ""), "ssl_handshake_errors"), 1);
}

/// TLS on a plaintext port gets no session and changes nothing; on a TLS
/// node, `-l notls:` keeps a plaintext listener beside the TLS one, both
/// on the same items.
#[test]
fn tls_on_a_plaintext_port_gets_no_session() {
    let files = Files::new("notls");
    let plain_port = common::free_tcp_port();
    let tls_port = common::free_tcp_port();
    let listen = format!("notls:127.0.0.1:{plain_port},127.0.0.1:{tls_port}");
    let server = start(&files, "", &["-l", &listen]);
    let plain_addr = format!("127.0.0.1:{plain_port}").parse().unwrap();
    let tls_addr: std::net::SocketAddr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let config = client_config(&files.ca.pem, None, false);
    assert!(
        connect(plain_addr, config.clone(), "localhost")
            .and_then(|mut c| c
                .call(b"version\r\n", Duration::from_secs(5))
                .map_err(|e| e.to_string()))
            .is_err(),
        "a TLS client was served on the plaintext port"
    );
    let mut plain = Client::connect_tcp(plain_addr).expect("plaintext listener");
    assert_eq!(plain.ask(b"set shared 0 0 2\r\nok\r\n"), "STORED\r\n");
    let mut tls = connect(tls_addr, config, "localhost").expect("TLS listener");
    assert_eq!(
        tls.ask(b"get shared\r\n"),
        "VALUE shared 0 2\r\nok\r\nEND\r\n"
    );
    assert_eq!(stat_value(&stats(&mut plain, ""), "curr_items"), 1);
    drop(server);

    // `notls` without -Z is refused, as memcached refuses it.
    let out = Command::new(env!("CARGO_BIN_EXE_webvac"))
        .args(["-p", "0", "-l", "notls:127.0.0.1"])
        .output()
        .expect("run webvac");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'notls' option is valid only when SSL is enabled"),
        "{err}"
    );
}

/// Handshakes that never finish are dropped after the handshake timeout
/// (the idle timeout, when shorter) and counted; a flood of them holds
/// connection slots only until then, and the node serves TLS clients once
/// they are gone.
#[test]
fn stalled_handshakes_are_dropped_and_a_flood_passes() {
    let files = Files::new("stall");
    let server = start(&files, "", &["-o", "idle_timeout=1", "-c", "40"]);
    let started = Instant::now();
    // Half a TLS record header: a handshake that never completes.
    let stalled: Vec<TcpStream> = (0..120)
        .filter_map(|_| {
            let mut s = TcpStream::connect(server.addr()).ok()?;
            let _ = s.write_all(&[0x16, 0x03]);
            Some(s)
        })
        .collect();
    assert!(stalled.len() >= 40, "could not open the flood");
    for mut s in stalled {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 256];
        // The node closes each (EOF or reset; the refused ones get memcached's
        // `ERROR Too many open connections` first).
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "stalled handshakes held past the idle timeout: {:?}",
        started.elapsed()
    );
    let mut c = tls_client(&server, &files);
    assert_eq!(c.ask(b"set after 0 0 1\r\nx\r\n"), "STORED\r\n");
    let general = stats(&mut c, "");
    assert!(
        stat_value(&general, "ssl_handshake_errors") >= 40,
        "{general}"
    );
    assert!(
        stat_value(&general, "rejected_connections") > 0,
        "{general}"
    );
    assert_eq!(stat_value(&general, "curr_connections"), 1, "{general}");
}

/// `ssl_verify_mode`: 2 requires a client certificate from `ssl_ca_cert`'s
/// CA, valid now; 1 takes a client with none but still refuses a bad one;
/// each refusal is a failed handshake, counted.
#[test]
fn client_certificates_are_checked_as_ssl_verify_mode_says() {
    let files = Files::new("verify");
    let good = files.ca.sign(&["client"], true, false);
    let expired = files.ca.sign(&["client"], true, true);
    let other = Ca::new("another CA").sign(&["client"], true, false);
    let ca = files.path("ca.pem");
    let config = |id: Option<&(String, String)>| client_config(&files.ca.pem, id, false);

    let required = start(&files, &format!("ssl_verify_mode=2,ssl_ca_cert={ca}"), &[]);
    assert!(
        served(&required, config(Some(&good))),
        "a good certificate was refused"
    );
    assert!(
        !served(&required, config(None)),
        "no certificate was served under mode 2"
    );
    assert!(
        !served(&required, config(Some(&expired))),
        "an expired certificate was served"
    );
    assert!(
        !served(&required, config(Some(&other))),
        "another CA's certificate was served"
    );
    // The same over TLS 1.2, where the refusal comes within the handshake.
    assert!(!served(
        &required,
        client_config(&files.ca.pem, Some(&other), true)
    ));
    let mut c = connect(required.addr(), config(Some(&good)), "localhost").unwrap();
    let general = stats(&mut c, "");
    assert_eq!(stat_value(&general, "ssl_handshake_errors"), 4, "{general}");
    assert!(stats(&mut c, "settings").contains("STAT ssl_verify_mode 3\r\n"));

    let requested = start(&files, &format!("ssl_verify_mode=1,ssl_ca_cert={ca}"), &[]);
    assert!(served(&requested, config(None)));
    assert!(served(&requested, config(Some(&good))));
    assert!(!served(&requested, config(Some(&other))));

    // A mode that checks certificates needs the CA to check them against.
    let out = Command::new(env!("CARGO_BIN_EXE_webvac"))
        .args(files.server_args("ssl_verify_mode=2"))
        .args(["-p", "0"])
        .output()
        .expect("run webvac");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs ssl_ca_cert"));
}

/// `ssl_min_version=3` refuses a TLS 1.2 client; the default takes it.
#[test]
fn ssl_min_version_sets_the_oldest_protocol() {
    let files = Files::new("version");
    let tls13 = start(&files, "ssl_min_version=3", &[]);
    assert!(!served(&tls13, client_config(&files.ca.pem, None, true)));
    assert!(served(&tls13, client_config(&files.ca.pem, None, false)));
    let default = start(&files, "", &[]);
    assert!(served(&default, client_config(&files.ca.pem, None, true)));
}

/// `refresh_certs` and SIGHUP read the certificate files again: new
/// connections get the new certificate, open ones keep working, and a
/// file that cannot be read is reported with memcached's message and
/// changes nothing.
#[test]
fn refresh_certs_and_sighup_swap_certificates_for_new_connections() {
    let files = Files::new("refresh");
    let server = start(&files, "", &[]);
    let mut old = tls_client(&server, &files);
    let before = stat_value(&stats(&mut old, ""), "time_since_server_cert_refresh");

    // A certificate from a new CA: only clients trusting it connect after.
    let new_ca = Ca::new("rotated CA");
    let (cert, key) = new_ca.sign(&["localhost", "127.0.0.1"], false, false);
    write(&files.dir.join("server.pem"), &cert);
    write(&files.dir.join("server.key"), &key);
    assert!(served(&server, client_config(&files.ca.pem, None, false)));
    assert_eq!(old.ask(b"refresh_certs\r\n"), "OK\r\n");
    assert!(!served(&server, client_config(&files.ca.pem, None, false)));
    assert!(served(&server, client_config(&new_ca.pem, None, false)));
    assert_eq!(old.ask(b"set still 0 0 2\r\nok\r\n"), "STORED\r\n");
    assert!(stat_value(&stats(&mut old, ""), "time_since_server_cert_refresh") <= before + 1);

    // A broken file: memcached's error, whatever noreply says; the
    // certificate in use stays.
    write(&files.dir.join("server.pem"), "not a certificate\n");
    let err = old.ask(b"refresh_certs noreply\r\n");
    assert!(
        err.starts_with(&format!(
            "Error loading the certificate chain: {} : ",
            files.path("server.pem")
        )),
        "{err}"
    );
    assert!(served(&server, client_config(&new_ca.pem, None, false)));

    // SIGHUP: back to the first CA's certificate.
    let (cert, key) = files.ca.sign(&["localhost", "127.0.0.1"], false, false);
    write(&files.dir.join("server.pem"), &cert);
    write(&files.dir.join("server.key"), &key);
    let pid = stat_value(&stats(&mut old, ""), "pid");
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for("SIGHUP reloads the certificates", || {
        served(&server, client_config(&files.ca.pem, None, false))
    });
    assert!(!served(&server, client_config(&new_ca.pem, None, false)));
}

/// Without TLS, `refresh_certs` and the `ssl_*` lines of `stats settings`
/// are exactly what memcached 1.6.18 (built with TLS, as Debian's is)
/// answers.
#[test]
fn without_tls_refresh_certs_and_settings_answer_as_memcached() {
    let reference = Memcached::start();
    let server = Server::start(&[]);
    let mut replies = Vec::new();
    for mut c in [reference.connect(), server.connect()] {
        let refresh = c.request(
            b"refresh_certs\r\nrefresh_certs noreply\r\nversion\r\n",
            &[b"VERSION 1.6.18\r\n"],
        );
        let settings = stats(&mut c, "settings");
        let ssl: Vec<String> = settings
            .lines()
            .filter(|l| l.starts_with("STAT ssl_"))
            .map(str::to_string)
            .collect();
        replies.push((String::from_utf8_lossy(&refresh).into_owned(), ssl));
    }
    assert_eq!(replies[0], replies[1], "memcached, then webvac");
    assert_eq!(replies[0].1.len(), 11);
}

/// pymemcache, a real client, over Python's ssl module: it verifies the
/// node's certificate against the CA and its name, stores and reads.
#[test]
fn pymemcache_speaks_tls_to_the_node() {
    common::require_tool("/usr/bin/python3", "python3 with pymemcache");
    let files = Files::new("pymemcache");
    let server = start(&files, "", &[]);
    let script = format!(
        r#"
import ssl
from pymemcache.client.base import Client
ctx = ssl.create_default_context(cafile={ca:?})
c = Client(("localhost", {port}), tls_context=ctx, connect_timeout=5, timeout=5)
assert c.set("py", b"over tls") is True
assert c.get("py") == b"over tls", c.get("py")
assert c.incr("n", 1) is None
c.set("n", b"41")
assert c.incr("n", 1) == 42
assert c.get_many(["py", "n", "missing"]) == {{"py": b"over tls", "n": b"42"}}
assert c.delete("py") is True
assert c.get("py") is None
print("ok")
"#,
        ca = files.path("ca.pem"),
        port = server.port()
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .output()
        .expect("run python3");
    assert!(
        out.status.success() && out.stdout.starts_with(b"ok"),
        "pymemcache over TLS failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.stderr_text()
    );
}

/// TLS connections stay within the documented memory bound, with the TLS
/// term (README, Limits: 80 KiB per TLS connection): a third of them
/// pipeline gets of a 200 KB value and never read, a third sit idle after
/// their handshake, and a third send all but the end of a 64 KiB
/// ClientHello (the most a handshake buffers) and stop. RSS from /proc.
#[test]
fn tls_connections_that_never_read_stay_within_the_bound() {
    const CONNECTIONS: usize = 900;
    const TLS_BYTES_PER_CONNECTION: u64 = 80 * 1024;
    let files = Files::new("memory");
    let server = start(&files, "", &["-m", "8", "-c", "2048"]);
    let config = client_config(&files.ca.pem, None, false);
    let mut setup = tls_client(&server, &files);
    let value = vec![b'v'; 200 * 1000];
    let mut set = format!("set big 0 0 {}\r\n", value.len()).into_bytes();
    set.extend_from_slice(&value);
    set.extend_from_slice(b"\r\n");
    assert_eq!(setup.ask(&set), "STORED\r\n");
    let (pid, _) = common::hostile::pid_and_budget(&mut setup);
    let baseline = common::proc_status_bytes(pid, "VmRSS:");
    let gets = b"get big\r\n".repeat(100);
    let mut held = Vec::with_capacity(CONNECTIONS);
    let mut partial = Vec::new();
    // The stopped handshakes last and quickly: each is dropped after the
    // 10 s handshake timeout.
    for i in 0..CONNECTIONS * 2 / 3 {
        let mut c = connect(server.addr(), config.clone(), "localhost").expect("handshake");
        if i % 2 == 0 {
            c.send(&gets).expect("pipeline gets");
        }
        held.push(c);
    }
    for _ in 0..CONNECTIONS / 3 {
        partial.push(partial_client_hello(&server));
    }
    // Every connection registered and the writers stalled on full sockets.
    wait_for("every connection open", || {
        stat_value(&stats(&mut setup, ""), "curr_connections") > CONNECTIONS as u64
    });
    std::thread::sleep(Duration::from_secs(1));
    let peak = common::proc_status_bytes(pid, "VmHWM:");
    let bound = common::hostile::bound(8, CONNECTIONS + 1)
        + TLS_BYTES_PER_CONNECTION * (CONNECTIONS as u64 + 1);
    println!(
        "{CONNECTIONS} TLS connections: baseline {} MiB, peak {} MiB, bound {} MiB",
        baseline >> 20,
        peak >> 20,
        bound >> 20
    );
    assert!(peak <= bound, "peak RSS {peak} over the bound {bound}");
    // The node still serves.
    assert_eq!(setup.ask(b"set after 0 0 1\r\nx\r\n"), "STORED\r\n");
    drop((held, partial));
}

/// A connection that sends all but the last 100 bytes of a ClientHello
/// that claims 65,520 bytes (about the most rustls buffers of one
/// handshake message), in TLS records of 16 KiB, then stops.
fn partial_client_hello(server: &Server) -> TcpStream {
    const CLAIMED: usize = 0xfff0;
    let mut s = TcpStream::connect(server.addr()).expect("connect");
    let mut message = vec![0x01, 0x00, 0xff, 0xf0, 0x03, 0x03];
    message.resize(4 + CLAIMED - 100, 0x41);
    for record in message.chunks(16384) {
        let len = record.len() as u16;
        let mut frame = vec![0x16, 0x03, 0x01];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(record);
        s.write_all(&frame).expect("send a record");
    }
    s
}

/// The node ends a TLS session with `close_notify`, as memcached does: a
/// client reads a clean end, not a cut connection.
#[test]
fn the_node_ends_sessions_with_close_notify() {
    let files = Files::new("close");
    let server = start(&files, "", &[]);
    let mut stream = common::tls::connect_raw(
        server.addr(),
        client_config(&files.ca.pem, None, false),
        "localhost",
    )
    .expect("handshake");
    stream.write_all(b"version\r\nquit\r\n").expect("send");
    stream.flush().expect("flush");
    let mut got = Vec::new();
    let end = stream.read_to_end(&mut got);
    assert!(got.starts_with(b"VERSION "), "{got:?}");
    assert!(end.is_ok(), "no close_notify: {end:?}");
}

/// A TLS 1.2 client that asks to renegotiate gets rustls's refusal at once
/// (memcached refuses it too), not silence: the alert written while
/// reading goes out without waiting for a reply.
#[test]
fn a_renegotiation_is_refused_at_once() {
    common::require_tool("/usr/bin/openssl", "the openssl command");
    let files = Files::new("reneg");
    let server = start(&files, "", &[]);
    let mut child = Command::new("/usr/bin/openssl")
        .args([
            "s_client",
            "-connect",
            &server.addr().to_string(),
            "-tls1_2",
            "-crlf",
        ])
        .args(["-CAfile", &files.path("ca.pem")])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    stdin.write_all(b"version\n").expect("send version");
    // Wait for the reply, so the renegotiation comes after the handshake.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.windows(8).any(|w| w == b"VERSION ") {
        assert!(
            Instant::now() < deadline,
            "no VERSION from s_client: {seen:?}"
        );
        let n = stdout.read(&mut buf).expect("read s_client");
        assert!(
            n > 0,
            "s_client ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    stdin.write_all(b"R\n").expect("ask to renegotiate");
    // The refusal ends s_client's session; stdin stays open, so only the
    // server's alert can end it.
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if started.elapsed() > Duration::from_secs(8) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the renegotiation got no answer in 8 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(stdin);
}

/// `webvac::client` with TLS and authentication: it checks each node's
/// certificate against the CA and the node's address (or a name given),
/// authenticates every connection, and reports a wrong name, an untrusted
/// node or a wrong password as an error naming the cause.
#[test]
fn the_client_library_speaks_tls_and_authenticates() {
    use webvac::client::tls::{ClientTls, TlsOptions};
    use webvac::client::{Client as Library, ClientConfig, Options};
    let files = Files::new("library");
    write(&files.dir.join("users"), "app:s3cret\n");
    let users = files.path("users");
    let server = start(&files, "", &["-Y", &users]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tls = ClientTls::from_files(&TlsOptions {
        ca_cert: Some(files.dir.join("ca.pem")),
        client_cert: None,
    })
    .expect("CA");
    let config = |tls: Option<ClientTls>, password: &str| ClientConfig {
        tls,
        auth: Some(("app".to_string(), password.to_string())),
        deadline: Duration::from_secs(5),
        ..ClientConfig::default()
    };
    let seeds = [server.addr()];

    let client = rt
        .block_on(Library::connect(
            &seeds,
            config(Some(tls.clone()), "s3cret"),
        ))
        .expect("TLS and auth");
    let options = Options::default();
    rt.block_on(client.set("lib", "over tls", &options))
        .expect("set");
    let got = rt.block_on(client.get("lib")).expect("get").expect("hit");
    assert_eq!(&got.data[..], b"over tls");

    let failure = |config: ClientConfig| {
        rt.block_on(Library::connect(&seeds, config))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_else(|| "connected".into())
    };
    let wrong_name = tls.clone().with_server_name("cache.example").unwrap();
    let err = failure(config(Some(wrong_name), "s3cret"));
    assert!(err.contains("certificate"), "{err}");
    let untrusted = Ca::new("untrusted");
    write(&files.dir.join("untrusted.pem"), &untrusted.pem);
    let other = ClientTls::from_files(&TlsOptions {
        ca_cert: Some(files.dir.join("untrusted.pem")),
        client_cert: None,
    })
    .unwrap();
    let err = failure(config(Some(other), "s3cret"));
    assert!(err.contains("certificate"), "{err}");
    let err = failure(config(Some(tls), "wrong"));
    assert!(err.contains("authentication refused"), "{err}");
    // Plaintext to the TLS port gets nowhere either.
    let err = failure(ClientConfig {
        connect_timeout: Duration::from_secs(2),
        ..config(None, "s3cret")
    });
    assert_ne!(err, "connected");
}

/// The same settings from a TOML file (`--config`), beside a `notls:`
/// listener.
#[test]
fn tls_settings_come_from_the_config_file_too() {
    let files = Files::new("toml");
    let plain_port = common::free_tcp_port();
    let tls_port = common::free_tcp_port();
    let toml = format!(
        "ssl_enabled = true\nssl_chain_cert = {:?}\nssl_key = {:?}\n\
         ssl_session_cache = true\nssl_wbuf_size = 64\n",
        files.path("server.pem"),
        files.path("server.key")
    );
    let config = files.dir.join("webvac.toml");
    write(&config, &toml);
    // (The harness passes `-l`, which a file's `listen` would yield to.)
    let listen = format!("127.0.0.1:{tls_port},notls:127.0.0.1:{plain_port}");
    let server = Server::start(&["--config", &config.display().to_string(), "-l", &listen]);
    let tls_addr = format!("127.0.0.1:{tls_port}").parse().unwrap();
    let mut c = connect(
        tls_addr,
        client_config(&files.ca.pem, None, false),
        "localhost",
    )
    .expect("TLS from the config file");
    let settings = stats(&mut c, "settings");
    assert!(
        settings.contains("STAT ssl_session_cache yes\r\n"),
        "{settings}"
    );
    assert!(
        settings.contains("STAT ssl_wbuf_size 65536\r\n"),
        "{settings}"
    );
    assert!(stats(&mut c, "").contains("STAT ssl_new_sessions "));
    let mut plain = Client::connect_tcp(format!("127.0.0.1:{plain_port}").parse().unwrap())
        .expect("the notls listener");
    assert!(plain.ask(b"version\r\n").starts_with("VERSION "));
    drop(server);
}

/// A cluster whose peers use the secret and TLS (`--cluster-tls-*`): it
/// forms and serves quorum reads and writes through every member; its peer
/// port speaks nothing but TLS with a certificate of the cluster's CA, so
/// plaintext and a certificate of another CA are refused before the
/// secret is even asked for, and counted in `peer_auth_failures`.
#[test]
fn a_cluster_whose_peers_use_the_secret_and_tls() {
    use common::cluster::{Cluster, Layout, cluster_stats, exclusive};
    let _serial = exclusive();
    let files = Files::new("peers");
    let (cert, key) = files.ca.sign_peer(&["127.0.0.1", "localhost"]);
    write(&files.dir.join("peer.pem"), &cert);
    write(&files.dir.join("peer.key"), &key);
    write(
        &files.dir.join("secret"),
        "the secret of the peer TLS test cluster\n",
    );
    let mut layout = Layout::new(3).quorums(2, 2);
    for flag in [
        format!("--cluster-secret-file={}", files.path("secret")),
        format!("--cluster-tls-cert={}", files.path("peer.pem")),
        format!("--cluster-tls-key={}", files.path("peer.key")),
        format!("--cluster-tls-ca={}", files.path("ca.pem")),
    ] {
        layout = layout.arg(flag);
    }
    let cluster = Cluster::start(layout);
    let mut one = cluster.connect(1);
    assert_eq!(one.ask(b"set over 0 0 5\r\npeers\r\n"), "STORED\r\n");
    for id in [1, 2, 3] {
        let got = cluster.connect(id).ask(b"mg over v Pr3\r\n");
        assert_eq!(got, "VA 5\r\npeers\r\n", "node {id}");
    }
    assert!(
        cluster.stderr_text(1).contains("peer_tls=true"),
        "{}",
        cluster.stderr_text(1)
    );

    let peer = cluster.member(2).peer;
    let failures = |c: &mut Client| {
        cluster_stats(c)
            .get("peer_auth_failures")
            .and_then(|v| v.parse::<u64>().ok())
            .expect("peer_auth_failures")
    };
    let mut two = cluster.connect(2);
    let before = failures(&mut two);
    // Plaintext: what a member would send first, without TLS.
    let mut plain = TcpStream::connect(peer).expect("connect");
    plain
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("timeout");
    let _ = plain.write_all(&[0u8; 64]);
    let mut got = Vec::new();
    let _ = plain.read_to_end(&mut got);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "plaintext got an answer: {got:?}"
    );
    // TLS with a certificate of another CA (this CA trusted for the node).
    let stranger = Ca::new("not the cluster's CA").sign_peer(&["127.0.0.1"]);
    let config = client_config(&files.ca.pem, Some(&stranger), false);
    let refused = match common::tls::connect_raw(peer, config, "127.0.0.1") {
        Err(_) => true,
        Ok(mut s) => {
            let _ = s.write_all(&[0u8; 16]);
            let mut buf = [0u8; 16];
            !matches!(s.read(&mut buf), Ok(n) if n > 0)
        }
    };
    assert!(
        refused,
        "another CA's certificate reached the peer protocol"
    );
    wait_for("both refusals counted", || failures(&mut two) >= before + 2);
    // And the cluster still serves.
    assert_eq!(two.ask(b"mg over v Pr3\r\n"), "VA 5\r\npeers\r\n");

    // `refresh_certs` rereads the peer files: a broken one is reported and
    // changes nothing; once fixed, it is taken.
    write(&files.dir.join("peer.pem"), "not a certificate\n");
    let err = two.ask(b"refresh_certs\r\n");
    assert!(
        err.starts_with(&format!(
            "Error loading the peer TLS files: {}: ",
            files.path("peer.pem")
        )),
        "{err}"
    );
    assert_eq!(two.ask(b"set still 0 0 2\r\nok\r\n"), "STORED\r\n");
    let (cert, key) = files.ca.sign_peer(&["127.0.0.1", "localhost"]);
    write(&files.dir.join("peer.pem"), &cert);
    write(&files.dir.join("peer.key"), &key);
    assert_eq!(two.ask(b"refresh_certs\r\n"), "OK\r\n");
}
