//! Ad-hoc: one step of a custom preset; prints the report (peak RSS and the plan's peak).
fn main() {
    let a: Vec<usize> = std::env::args().skip(1).take(7).map(|s| s.parse().unwrap()).collect();
    let ck = std::env::args().nth(8).is_some();
    let p = cogvx_bench::Preset { name: "probe", heads: a[0], head_dim: a[1], layers: a[2], text_len: a[3], lat: (a[4], a[5], a[6]), rank: 128 };
    let r = cogvx_bench::train_step_with(&p, cogvx_bench::StepOptions { threads: 2, steps: 1, warmup: 0, gradient_checkpointing: ck }).unwrap();
    println!("{} tokens={} rss={:?} plan={:?} t={}", a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","), r.tokens, r.peak_rss_mib, r.plan_peak_mib, r.median_s);
}
