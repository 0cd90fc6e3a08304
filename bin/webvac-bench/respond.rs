//! The trivial responder: a server that parses each request with webvac's
//! own parser and answers a fixed reply, with no store behind it. It runs on
//! the same runtime and I/O loop shape as `webvac`, so it is the ceiling
//! for webvac on this machine: what is left is parsing, syscalls and tokio.

use std::net::SocketAddr;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use webvac::protocol::meta::MetaRequest;
use webvac::protocol::{ParseLimits, Parsed, Request, parse};

/// Every hit returns this many bytes of value.
const VALUE_BYTES: usize = 100;

const LIMITS: ParseLimits = ParseLimits {
    item_bytes_max: 1024 * 1024,
    data_bytes_max: 64 * 1024 * 1024,
};

pub fn serve(listen: SocketAddr, threads: usize) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        eprintln!("responding on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            tokio::spawn(async move {
                let _ = connection(stream).await;
            });
        }
    })
}

async fn connection(mut stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let value = [b'x'; VALUE_BYTES];
    let mut inbuf = BytesMut::with_capacity(16 * 1024);
    let mut out = Vec::with_capacity(16 * 1024);
    loop {
        inbuf.reserve(16 * 1024);
        if stream.read_buf(&mut inbuf).await? == 0 {
            return Ok(());
        }
        while let Parsed::Complete { request, consumed } = parse(&inbuf, &LIMITS) {
            match request {
                Request::Get(get) => {
                    for key in get.keys() {
                        out.extend_from_slice(b"VALUE ");
                        out.extend_from_slice(key);
                        out.extend_from_slice(b" 0 100\r\n");
                        out.extend_from_slice(&value);
                        out.extend_from_slice(b"\r\n");
                    }
                    out.extend_from_slice(b"END\r\n");
                }
                Request::Storage(_) => out.extend_from_slice(b"STORED\r\n"),
                Request::Meta(MetaRequest::Get(_)) => {
                    out.extend_from_slice(b"VA 100\r\n");
                    out.extend_from_slice(&value);
                    out.extend_from_slice(b"\r\n");
                }
                Request::Meta(MetaRequest::Set(_)) => out.extend_from_slice(b"HD\r\n"),
                Request::Meta(MetaRequest::Noop) => out.extend_from_slice(b"MN\r\n"),
                Request::Quit | Request::Close => return Ok(()),
                _ => out.extend_from_slice(b"ERROR\r\n"),
            }
            inbuf.advance(consumed);
        }
        stream.write_all(&out).await?;
        out.clear();
    }
}
