//! Parsing the hot commands: get, set, a 10-key multi-get, and meta commands.

use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};
use webvac::protocol::{ParseLimits, Parsed, parse};

const LIMITS: ParseLimits = ParseLimits {
    item_bytes_max: 1024 * 1024,
    data_bytes_max: usize::MAX,
};

fn bench_one(c: &mut Criterion, name: &str, input: &[u8]) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(input.len() as u64));
    g.bench_function(name, |b| {
        b.iter(|| match parse(black_box(input), &LIMITS) {
            Parsed::Complete { consumed, .. } => consumed,
            Parsed::Incomplete => unreachable!(),
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_one(c, "get", b"get user:1234567890:profile\r\n");
    let mut set = b"set user:1234567890:profile 0 300 100\r\n".to_vec();
    set.extend_from_slice(&[b'x'; 100]);
    set.extend_from_slice(b"\r\n");
    bench_one(c, "set_100b", &set);
    let multi: String = std::iter::once("get".to_string())
        .chain((0..10).map(|i| format!(" user:{i:010}:profile")))
        .collect::<String>()
        + "\r\n";
    bench_one(c, "multiget_10", multi.as_bytes());
    bench_one(c, "mg_v_t_c_f", b"mg user:1234567890:profile v t c f\r\n");
    let mut ms = b"ms user:1234567890:profile 100 T300 F5 c\r\n".to_vec();
    ms.extend_from_slice(&[b'x'; 100]);
    ms.extend_from_slice(b"\r\n");
    bench_one(c, "ms_100b", &ms);
}

criterion_group!(parse_benches, benches);
criterion_main!(parse_benches);
