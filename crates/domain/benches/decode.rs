//! Decode + validate throughput for a batch of 1 (what the extension sends)
//! and of 100 events (a replay or a batching client).
//!
//! `cargo bench -p cellmon-domain --bench decode`

use std::hint::black_box;

use cellmon_domain::{WireEvent, decode_batch, validate};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use time::macros::datetime;

fn event_json(i: usize) -> String {
    let failed = i.is_multiple_of(7);
    let code = "import numpy as np\nx = np.arange(10)\nprint(x.sum())\n".repeat(8);
    serde_json::json!({
        "eventId": format!("0b3c4f9e-8a61-4f5e-9c47-{i:012x}"),
        "eventType": "cell_executed",
        "eventTime": "2026-04-01T10:00:00.123Z",
        "emailAddress": format!("student{i}@example.ac.jp"),
        "userName": "山田 花子",
        "teamName": "チームA",
        "sessionId": "6f1e3a52-0c57-4d1e-a4f5-3b0b6a2d9c11",
        "notebookPath": "lesson1/intro.ipynb",
        "cellId": "a1b2c3d4",
        "cellIndex": 3,
        "cellType": "code",
        "code": code,
        "executionCount": 7,
        "hasError": failed,
        "errorMessage": if failed { Some("NameError: name 'x' is not defined") } else { None },
        "result": "45",
        "executionDurationMs": 12.5
    })
    .to_string()
}

fn batch(n: usize) -> Vec<u8> {
    let items: Vec<String> = (0..n).map(event_json).collect();
    format!("[{}]", items.join(",")).into_bytes()
}

fn decode_and_validate(c: &mut Criterion) {
    let received_at = datetime!(2026-04-01 10:00:01 UTC);
    let mut group = c.benchmark_group("decode_validate");
    for n in [1usize, 100] {
        let body = batch(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::from_parameter(n), &body, |b, body| {
            b.iter(|| {
                let items = decode_batch(black_box(body)).expect("valid batch");
                let mut accepted = 0usize;
                for item in items {
                    let wire = WireEvent::from_item(item).expect("valid item");
                    if validate(wire, received_at).is_ok() {
                        accepted += 1;
                    }
                }
                assert_eq!(accepted, n);
                accepted
            });
        });
    }
    group.finish();
}

criterion_group!(benches, decode_and_validate);
criterion_main!(benches);
