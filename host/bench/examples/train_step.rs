//! The cogvx side of `shared/bench/torch_train_step.py`, until `cogvx bench train-step` is wired:
//!
//! ```text
//! cargo run -p cogvx-bench --example train_step -- [--preset S|M] [--threads N] [--steps N] [--warmup N]
//! ```
//!
//! Prints one JSON line ([`cogvx_bench::BenchReport::to_json_line`]); defaults as the script
//! (preset S, 2 threads, 5 timed steps after 2 warm-up steps).

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut preset = "S".to_string();
    let (mut threads, mut steps, mut warmup) = (2usize, 5usize, 2usize);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let Some(value) = args.get(i + 1) else {
            eprintln!("error: `{}` needs a value", args[i]);
            return ExitCode::from(2);
        };
        let number = || value.parse::<usize>().map_err(|_| format!("`{}` takes a whole number, got `{value}`", args[i]));
        let parsed = match args[i].as_str() {
            "--preset" => {
                preset = value.clone();
                Ok(())
            }
            "--threads" => number().map(|n| threads = n),
            "--steps" => number().map(|n| steps = n),
            "--warmup" => number().map(|n| warmup = n),
            other => Err(format!("unknown argument `{other}` (expected --preset, --threads, --steps, --warmup)")),
        };
        if let Err(e) = parsed {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
        i += 2;
    }
    match cogvx_bench::train_step(&preset, threads, steps, warmup) {
        Ok(report) => {
            eprintln!("losses: {:?}", report.losses);
            println!("{}", report.to_json_line());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
