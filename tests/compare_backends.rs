//! The backend comparison binary, in its quick mode, on every backend in the build.

mod support;

const BIN: &str = env!("CARGO_BIN_EXE_compare_backends");

#[test]
fn quick_mode_writes_positive_finite_figures_for_every_backend() {
    let dir = support::tempdir();
    let out = dir.path().join("cmp");
    let corpus = support::corpus_path();
    let mut args = vec![
        "--quick",
        "--data",
        corpus.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    let skip_wgpu = support::wgpu_device().is_none();
    if skip_wgpu {
        args.extend(["--backends", "ndarray,flex"]);
    }
    let (code, stdout, err) = support::run_bin(BIN, &args, &[]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let backends = json["backends"].as_array().unwrap();
    let names: Vec<&str> = backends
        .iter()
        .map(|b| b["backend"].as_str().unwrap())
        .collect();
    assert!(
        names.contains(&"ndarray") && names.contains(&"flex"),
        "{names:?}"
    );
    if !skip_wgpu {
        assert!(names.contains(&"wgpu"), "{names:?}");
    }
    let positive = |v: &serde_json::Value, what: &str| {
        let x = v
            .as_f64()
            .unwrap_or_else(|| panic!("{what} is not a number: {v}"));
        assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    };
    for b in backends {
        let name = b["backend"].as_str().unwrap();
        for m in b["matmul"].as_array().unwrap() {
            positive(&m["gflops"], &format!("{name} matmul"));
        }
        for t in b["train"].as_array().unwrap() {
            for key in [
                "first_step_ms",
                "median_ms_per_step",
                "tokens_per_s",
                "gflops",
            ] {
                positive(&t[key], &format!("{name} train {key}"));
            }
            // The figures follow from the step time and the preset's shape: a rate from the
            // wrong count of tokens or FLOPs would not.
            let preset = t["preset"].as_str().unwrap();
            let cfg = course::ch04_pretrain::preset(preset, 65).unwrap();
            let tokens = (cfg.batch_size * cfg.model.block_size) as f64;
            let ms = t["median_ms_per_step"].as_f64().unwrap();
            let tps = t["tokens_per_s"].as_f64().unwrap();
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs();
            assert!(
                close(tps, tokens * 1e3 / ms),
                "{name} {preset}: {tps} tokens/s"
            );
            let gflops = t["gflops"].as_f64().unwrap();
            let want = tps * cfg.model.flops_per_token() / 1e9;
            assert!(
                close(gflops, want),
                "{name} {preset}: {gflops} GFLOP/s, want {want}"
            );
            assert_eq!(t["timed_steps"], 2, "quick mode times 2 steps");
        }
        for g in b["generation"].as_array().unwrap() {
            for key in ["tokens_per_s", "cached_tokens_per_s", "cache_speedup"] {
                positive(&g[key], &format!("{name} generation {key}"));
            }
            let ratio =
                g["cached_tokens_per_s"].as_f64().unwrap() / g["tokens_per_s"].as_f64().unwrap();
            assert!((g["cache_speedup"].as_f64().unwrap() - ratio).abs() < 1e-9);
        }
        assert_eq!(
            b["generation"].as_array().unwrap().len(),
            b["train"].as_array().unwrap().len(),
            "one per preset"
        );
        let diff = b["max_abs_diff"].as_f64().unwrap();
        assert!(
            diff.is_finite() && diff <= 1e-4,
            "{name}: max_abs_diff {diff}"
        );
        assert_eq!(
            b["parity"].as_array().unwrap().len(),
            4,
            "one parity figure per chapter model"
        );
    }
    assert!(json["machine"]["cores"].as_u64().unwrap() >= 1);
    assert!(
        std::fs::read_to_string(out.join("chart.svg"))
            .unwrap()
            .starts_with("<svg")
    );
    assert!(
        std::fs::read_to_string(out.join("results.md"))
            .unwrap()
            .contains("| ndarray |")
    );
}

#[test]
fn ops_mode_times_every_operation_on_each_cpu_backend() {
    let dir = support::tempdir();
    let out = dir.path().join("ops");
    let args = [
        "--ops",
        "--quick",
        "--backends",
        "ndarray,flex",
        "--out",
        out.to_str().unwrap(),
    ];
    let (code, stdout, err) = support::run_bin(BIN, &args, &[]);
    assert_eq!(code, 0, "{stdout}\n{err}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ops.json")).unwrap()).unwrap();
    let backends = json["backends"].as_array().unwrap();
    assert_eq!(backends.len(), 2);
    let shape = json["shape"].as_array().unwrap();
    let elements = shape[0].as_f64().unwrap() * shape[1].as_f64().unwrap();
    let table = std::fs::read_to_string(out.join("ops.md")).unwrap();
    let rows: Vec<&str> = table.lines().skip(2).collect();
    for (column, b) in backends.iter().enumerate() {
        let ops = b[1].as_array().unwrap();
        assert_eq!(ops.len(), 13, "{ops:?}");
        assert_eq!(rows.len(), ops.len(), "{table}");
        for (op, row) in ops.iter().zip(&rows) {
            let (us, ns) = (
                op["micros"].as_f64().unwrap(),
                op["ns_per_element"].as_f64().unwrap(),
            );
            assert!(ns.is_finite() && ns > 0.0, "{op}");
            // Per element is per call over the tensor's size, not some other count.
            assert!((ns - us * 1e3 / elements).abs() <= 1e-9 * ns, "{op}");
            // The table shows these figures, in this backend's pair of columns.
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            let name = op["op"].as_str().unwrap();
            assert_eq!(cells[1], format!("`{name}`"), "{row}");
            // serde_json may read a float back one ulp off, which can flip a rounding at a
            // half, so the cell is checked to be the figure rounded, not the same string.
            let shown = |i: usize| cells[i].parse::<f64>().unwrap_or(f64::NAN);
            assert!(
                (shown(2 + 2 * column) - us).abs() <= 0.05 + 1e-9,
                "{row}: {us}"
            );
            assert!(
                (shown(3 + 2 * column) - ns).abs() <= 0.005 + 1e-9,
                "{row}: {ns}"
            );
        }
    }
    assert!(table.contains("flex: ns/element"), "{table}");
}
