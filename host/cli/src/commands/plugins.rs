//! `cogvx plugins`.

use anyhow::Result;
use std::process::ExitCode;

use super::Settings;

pub fn run(settings: &Settings) -> Result<ExitCode> {
    let registry = settings.registry()?;
    let rows = registry.list();
    let header = ["NAME", "VERSION", "KINDS", "TRANSPORT", "API", "SOURCE"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                r.version.clone(),
                r.kinds
                    .iter()
                    .map(|k| k.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                r.transport.to_string(),
                r.api_version.clone(),
                r.source.clone(),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.len());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cols: &[String]| {
        cols.iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(&header.map(String::from)));
    for row in &cells {
        println!("{}", line(row));
    }
    Ok(ExitCode::SUCCESS)
}
