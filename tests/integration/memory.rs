//! Streaming, checked by a counter: an allocator that tracks the bytes each thread holds, so
//! `inspect` and `export` over a million records can be shown to hold a bounded amount of memory
//! (a small fraction of the file), whatever the machine's speed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::Write;
use std::path::Path;

use data_generator::export::{export, ExportFormat, Filters};
use data_generator::inspect::{inspect, InspectOptions, Source};

struct Counting;

thread_local! {
    static HELD: Cell<i64> = const { Cell::new(0) };
    static PEAK: Cell<i64> = const { Cell::new(0) };
}

fn note(delta: i64) {
    // `try_with`: during thread teardown the counters may be gone; then nothing is counted.
    let _ = HELD.try_with(|h| {
        let now = h.get() + delta;
        h.set(now);
        let _ = PEAK.try_with(|p| {
            if now > p.get() {
                p.set(now);
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size() as i64);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note(-(layout.size() as i64));
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size as i64 - layout.size() as i64);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Peak bytes held by this thread while `f` runs, above what it held before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, i64) {
    let base = HELD.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let out = f();
    (out, PEAK.with(Cell::get) - base)
}

/// A dataset of `n` records, one in ten cut by length, each about 400 bytes.
pub fn write_big_dataset(path: &Path, n: u64) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("create"));
    for i in 0..n {
        let reason = if i % 10 == 0 { "length" } else { "stop" };
        writeln!(
            f,
            r#"{{"id":"row-{i}","sample":0,"model":"m","system":null,"prompt":"Question number {i}?","response":"Answer {i}: the quick brown fox jumps over the lazy dog, again and again, {i}.","thinking":null,"done_reason":"{reason}","prompt_tokens":12,"completion_tokens":{},"duration_ms":900,"attempts":1,"finished_at":"2026-11-22T00:00:00.000Z","seed":42,"eval_duration_ms":800.0,"key":"{i:032x}","input":{{"q":"Question number {i}?"}}}}"#,
            20 + i % 50
        )
        .expect("write");
    }
    f.flush().expect("flush");
}

#[test]
fn inspect_and_export_of_a_million_records_hold_bounded_memory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("dataset.jsonl");
    let n = 1_000_000u64;
    write_big_dataset(&path, n);
    let file_size = std::fs::metadata(&path).expect("size").len() as i64;
    let src = Source::locate(&path).expect("source");

    let (report, peak) = peak_during(|| inspect(&src, &InspectOptions { sample: 5, ..Default::default() }).expect("inspect"));
    assert_eq!(report.records, n);
    assert_eq!(report.done_reasons.get("length"), Some(&(n / 10)));
    assert_eq!(report.sampled.len(), 5);
    // What grows is two 8-byte hashes per record (unique ids, distinct responses) in hash sets:
    // about 40 MB for a million, against a file of several hundred MB.
    assert!(peak < 80 << 20, "inspect held {} MB at its peak", peak >> 20);
    assert!(peak < file_size / 4, "inspect held {peak} bytes for a {file_size}-byte file");

    let mut sink = std::io::sink();
    let (stats, peak) = peak_during(|| {
        export(&src, ExportFormat::Messages, &Filters::default(), &mut sink, Path::new("sink")).expect("export")
    });
    assert_eq!(stats.written, n);
    assert!(peak < 80 << 20, "export held {} MB at its peak", peak >> 20);
}
