//! The shared spine: tokenizer, batches, data loading and the downloader.

mod support;

use course::common::backend::Backend;
use course::common::data::{Remote, download, download_remote, load_corpus, read_text};
use course::common::dataset::{Dataset, Split, rng_for, stream};
use course::common::sample::{SampleOptions, pick_token};
use course::common::tokenizer::CharTokenizer;
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

#[test]
fn tokenizer_round_trips_the_whole_corpus() {
    let text = support::corpus();
    let tok = CharTokenizer::from_text(&text);
    assert_eq!(tok.vocab_size(), 65);
    let ids = tok.encode(&text).unwrap();
    assert_eq!(ids.len(), text.chars().count());
    assert_eq!(tok.decode(&ids), text);
    // Sorted vocabulary: newline first, then space, then punctuation, digits, letters.
    assert_eq!(tok.chars()[0], '\n');
    assert_eq!(tok.chars()[1], ' ');
}

#[test]
fn unknown_characters_are_an_error_that_names_them() {
    let tok = CharTokenizer::from_text("abc");
    let err = tok.encode("abz€").unwrap_err().to_string();
    assert!(err.contains("'z'") && err.contains("'€'"), "{err}");
}

#[test]
fn batch_targets_are_inputs_shifted_by_one() {
    let text = support::corpus();
    let data = Dataset::new(&text).unwrap();
    assert_eq!(data.train.len() + data.val.len(), text.chars().count());
    assert_eq!(data.train.len(), text.chars().count() * 9 / 10);
    let mut rng = rng_for(7, stream::TRAIN, 0);
    for split in [Split::Train, Split::Val] {
        let (x, y) = data.sample_ids(split, 16, 32, &mut rng);
        assert_eq!(x.len(), 16 * 32);
        for b in 0..16 {
            let (xr, yr) = (&x[b * 32..(b + 1) * 32], &y[b * 32..(b + 1) * 32]);
            assert_eq!(&xr[1..], &yr[..31], "y is x shifted left by one");
            // And each row is a real stretch of the split.
            let s = data.split(split);
            let start = (0..s.len() - 32)
                .find(|&i| s[i..i + 32].iter().zip(xr).all(|(&a, &b)| a as i64 == b))
                .expect("row found in the split");
            assert_eq!(s[start + 32] as i64, yr[31]);
        }
    }
}

#[test]
fn batches_depend_only_on_seed_and_step() {
    let data = Dataset::new(&support::corpus()).unwrap();
    let a = data.sample_ids(Split::Train, 4, 8, &mut rng_for(1, stream::TRAIN, 5));
    let b = data.sample_ids(Split::Train, 4, 8, &mut rng_for(1, stream::TRAIN, 5));
    let c = data.sample_ids(Split::Train, 4, 8, &mut rng_for(1, stream::TRAIN, 6));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn text_too_short_for_one_block_is_a_clear_error() {
    let data = Dataset::new("hello world, this is short").unwrap();
    let err = data.check_block_size(8).unwrap_err().to_string();
    assert!(err.contains("too short for block size 8"), "{err}");
    assert!(data.check_block_size(1).is_ok());
}

#[test]
fn missing_and_non_utf8_files_are_clear_errors() {
    let dir = support::tempdir();
    let missing = dir.path().join("nope.txt");
    let err = format!("{:#}", load_corpus(Some(&missing)).err().unwrap());
    assert!(
        err.contains("cannot read the data file") && err.contains("--data"),
        "{err}"
    );

    let binary = dir.path().join("bin.txt");
    std::fs::write(&binary, [b'o', b'k', 0xff, 0xfe]).unwrap();
    let err = read_text(&binary).unwrap_err().to_string();
    assert!(
        err.contains("not UTF-8") && err.contains("offset 2"),
        "{err}"
    );
}

fn sha256_hex(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

#[test]
fn download_verifies_the_checksum_and_renames_when_whole() {
    let body = b"First Citizen:\nBefore we proceed any further, hear me speak.\n".repeat(100);
    let dir = support::tempdir();
    let dest = dir.path().join("sub/corpus.txt");
    download(
        &support::serve_once(body.clone()),
        &dest,
        &sha256_hex(&body),
    )
    .unwrap();
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    let leftovers: Vec<_> = std::fs::read_dir(dest.parent().unwrap()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "only the final file remains");
}

#[test]
fn download_with_a_wrong_checksum_leaves_nothing_behind() {
    let body = b"not the file you are looking for".to_vec();
    let dir = support::tempdir();
    let dest = dir.path().join("corpus.txt");
    let err = download(&support::serve_once(body), &dest, &"0".repeat(64))
        .unwrap_err()
        .to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file left behind"
    );
}

#[test]
fn download_without_network_points_at_the_data_flag() {
    // Bind then drop a listener: nothing answers on that port any more.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = support::tempdir();
    let dest = dir.path().join("corpus.txt");
    let url = format!("http://127.0.0.1:{port}/input.txt");
    let err = download(&url, &dest, &"0".repeat(64))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("could not download") && err.contains("--data"),
        "{err}"
    );
    assert!(!dest.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn backend_names_parse_and_unknown_ones_list_the_choices() {
    assert_eq!("ndarray".parse::<Backend>().unwrap(), Backend::Ndarray);
    assert_eq!("FLEX".parse::<Backend>().unwrap(), Backend::Flex);
    let err = "tpu".parse::<Backend>().unwrap_err();
    assert!(
        err.contains("unknown backend 'tpu'") && err.contains("ndarray, flex"),
        "{err}"
    );
}

#[test]
fn greedy_picks_the_argmax_and_top_k_stays_in_the_top_k() {
    let logits = [0.1f32, 2.0, -1.0, 1.9, 0.5, 1.8];
    let mut rng = rng_for(0, stream::SAMPLE, 0);
    let greedy = SampleOptions {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };
    assert_eq!(pick_token(&logits, greedy, &mut rng), 1);
    let top3 = SampleOptions {
        temperature: 5.0,
        top_k: Some(3),
        top_p: None,
    };
    let mut seen = [0usize; 6];
    for _ in 0..2000 {
        seen[pick_token(&logits, top3, &mut rng)] += 1;
    }
    assert_eq!(
        seen[0] + seen[2] + seen[4],
        0,
        "only tokens 1, 3, 5 are in the top 3: {seen:?}"
    );
    assert!(seen[1] > 0 && seen[3] > 0 && seen[5] > 0, "{seen:?}");
    // Without top-k, a high temperature reaches every token.
    let hot = SampleOptions {
        temperature: 5.0,
        top_k: None,
        top_p: None,
    };
    let mut all = [0usize; 6];
    for _ in 0..2000 {
        all[pick_token(&logits, hot, &mut rng)] += 1;
    }
    assert!(all.iter().all(|&n| n > 0), "{all:?}");
}

#[test]
fn clip_grad_norm_measures_the_global_norm_and_scales_only_above_it() {
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use burn::prelude::*;
    use course::common::train::clip_grad_norm;
    let device = support::ndarray_device().autodiff();
    // A Linear 2 -> 1 with known weights; loss = sum(W x + b) for x = [3, 4]:
    // dL/dW = [3, 4], dL/db = [1], so the global norm is sqrt(9 + 16 + 1) = sqrt(26).
    let linear = burn::nn::LinearConfig::new(2, 1).init(&device);
    let x = Tensor::<2>::from_data([[3.0f32, 4.0]], &device);
    let grads = || GradientsParams::from_grads(linear.forward(x.clone()).sum().backward(), &linear);
    let weight_grad = |g: &GradientsParams| {
        let w = g.get::<2>(linear.weight.id).unwrap();
        w.into_data().try_to_vec::<f32>().unwrap()
    };
    let expected = 26f64.sqrt();
    let (g, norm) = clip_grad_norm(grads(), &linear, None);
    assert!((norm - expected).abs() < 1e-5, "{norm} vs {expected}");
    assert_eq!(weight_grad(&g), vec![3.0, 4.0]);
    // Above the norm: untouched.
    let (g, _) = clip_grad_norm(grads(), &linear, Some(10.0));
    assert_eq!(weight_grad(&g), vec![3.0, 4.0]);
    // Below it: every gradient scaled by max_norm / norm, so the new global norm is max_norm.
    let (g, norm_before) = clip_grad_norm(grads(), &linear, Some(1.0));
    assert!((norm_before - expected).abs() < 1e-5);
    let w = weight_grad(&g);
    let s = (1.0 / expected) as f32;
    assert!(
        (w[0] - 3.0 * s).abs() < 1e-5 && (w[1] - 4.0 * s).abs() < 1e-5,
        "{w:?}"
    );
    let b = g.get::<1>(linear.bias.as_ref().unwrap().id).unwrap();
    assert!((b.into_scalar::<f32>() - s).abs() < 1e-5);
    assert_eq!(linear.num_params(), 3);
}

#[test]
fn padded_fixed_shape_generation_gives_the_same_tokens_as_plain_generation() {
    use course::ch03_gpt::GptConfig;
    use course::common::sample::{generate, generate_fixed_shape};
    let device = support::ndarray_device();
    device.seed(11);
    // Block 16, 40 new tokens: the context grows past the block, so both crop and the padded
    // version pads while the context is short.
    let model = GptConfig::new(65, 16, 2, 2, 32).init(&device);
    // Greedy: the tokens depend on the logits alone (sampling could flip on a last-digit
    // difference between two matrix-product shapes).
    let greedy = SampleOptions {
        temperature: 0.0,
        top_k: None,
        top_p: None,
    };
    let mut rng = rng_for(1, stream::SAMPLE, 0);
    let plain = generate(&model, &[5, 6, 7], 40, greedy, &mut rng, |_| {});
    let padded = generate_fixed_shape(&model, &[5, 6, 7], 40, greedy, &mut rng, |_| {});
    assert_eq!(plain.len(), 40);
    assert_eq!(plain, padded);
}

#[test]
fn top_p_keeps_the_smallest_set_that_reaches_p() {
    // Probabilities about 0.64, 0.24, 0.09, 0.03: the first two hold 0.87 of the mass.
    let logits = [3.0f32, 2.0, 1.0, 0.0];
    let mut rng = rng_for(0, stream::SAMPLE, 0);
    let opts = |p| SampleOptions {
        temperature: 1.0,
        top_k: None,
        top_p: Some(p),
    };
    let count = |p: f64, rng: &mut rand::rngs::StdRng| {
        let mut seen = [0usize; 4];
        for _ in 0..3000 {
            seen[pick_token(&logits, opts(p), rng)] += 1;
        }
        seen
    };
    let seen = count(0.8, &mut rng);
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
    assert_eq!(
        seen[2] + seen[3],
        0,
        "0.8 needs only the two likeliest: {seen:?}"
    );
    // Renormalised: 0.64 / 0.87 of the draws go to token 0.
    let share = seen[0] as f64 / 3000.0;
    assert!((share - 0.731).abs() < 0.03, "share of token 0: {share}");
    let seen = count(0.5, &mut rng);
    assert_eq!(
        seen[0], 3000,
        "0.5 is reached by the first token alone: {seen:?}"
    );
    let seen = count(1.0, &mut rng);
    assert!(
        seen.iter().all(|&n| n > 0),
        "1.0 keeps everything: {seen:?}"
    );
}

/// Serves `body` twice: the first connection breaks off after `cut` bytes, the second must
/// ask for the rest with a range and gets it as 206 Partial Content. Returns the URL and
/// the range header the second request carried.
fn serve_with_a_cut(body: Vec<u8>, cut: usize) -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for attempt in 0..2 {
            let Ok((mut stream, _)) = listener.accept() else {
                return;
            };
            let mut buf = [0u8; 4096];
            let n = stream.read(&mut buf).unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_lowercase();
            if attempt == 0 {
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(&body[..cut]);
                continue; // dropped: the connection closes mid-body
            }
            let range = (request.lines())
                .find_map(|l| l.strip_prefix("range: bytes="))
                .unwrap_or("")
                .trim()
                .to_string();
            let _ = tx.send(range.clone());
            let from: usize = range.trim_end_matches('-').parse().unwrap_or(0);
            let head = format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{}/{}\r\nConnection: close\r\n\r\n",
                body.len() - from,
                body.len() - 1,
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[from..]);
        }
    });
    (format!("http://{addr}/model.safetensors"), rx)
}

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let (url, range) = serve_with_a_cut(body.clone(), 70_000);
    let dir = support::tempdir();
    let dest = dir.path().join("model.safetensors");
    let sha = sha256_hex(&body);
    let remote = Remote {
        url: &url,
        sha256: &sha,
        size: Some(body.len() as u64),
        offline_hint: "pass --weights",
    };
    let err = download_remote(&remote, &dest).unwrap_err().to_string();
    assert!(err.contains("run again to resume"), "{err}");
    assert!(
        !dest.exists(),
        "nothing at the destination until whole and verified"
    );
    let part = dest.with_extension("part");
    assert_eq!(std::fs::read(&part).unwrap(), &body[..70_000]);

    download_remote(&remote, &dest).unwrap();
    assert_eq!(
        range.recv().unwrap(),
        "70000-",
        "only the missing bytes were asked for"
    );
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert!(!part.exists());
}

/// The `Range` a request on `stream` asks for (`"70000-"`), or "" without one. Reads the
/// whole head, so closing the connection after the answer loses none of it.
fn range_asked(stream: &mut TcpStream) -> String {
    let (mut head, mut buf) = (Vec::new(), [0u8; 1024]);
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    (head.lines())
        .find_map(|l| l.strip_prefix("range: bytes="))
        .map_or(String::new(), |r| r.trim().to_string())
}

/// A server on 127.0.0.1 whose file is `body` and which has nothing past the bytes a client
/// kept: a request with a range gets 416 Range Not Satisfiable, one without the whole file.
/// Serves `requests` connections, or stops after 10 seconds; sends each request's range
/// ("" for none) to the receiver, which ends when the server does.
fn serve_whole_or_416(body: Vec<u8>, requests: usize) -> (String, Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap(); // polled, so that it can stop by itself
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut served = 0;
        while served < requests && Instant::now() < deadline {
            let mut stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(_) => return,
            };
            served += 1;
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let range = range_asked(&mut stream);
            let _ = tx.send(range.clone());
            let head = if range.is_empty() {
                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", body.len())
            } else {
                format!(
                    "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\n\
                     Content-Length: 0\r\n",
                    body.len()
                )
            };
            let _ = stream.write_all(format!("{head}Connection: close\r\n\r\n").as_bytes());
            if range.is_empty() {
                let _ = stream.write_all(&body);
            }
        }
    });
    (format!("http://{addr}/model.safetensors"), rx)
}

#[test]
fn a_whole_part_file_is_checked_and_kept_when_the_server_has_nothing_to_add() {
    // No size known in advance (as for the corpus): only the server's 416 says it is whole.
    fn remote<'a>(url: &'a str, sha256: &'a str) -> Remote<'a> {
        Remote {
            url,
            sha256,
            size: None,
            offline_hint: "pass --weights",
        }
    }
    let body: Vec<u8> = (0..50_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let sha = sha256_hex(&body);
    let dir = support::tempdir();
    let dest = dir.path().join("model.safetensors");
    let part = dest.with_extension("part");
    // Whole and right (the process died before the rename): it becomes the file.
    std::fs::write(&part, &body).unwrap();
    let (url, ranges) = serve_whole_or_416(body.clone(), 1);
    download_remote(&remote(&url, &sha), &dest).unwrap();
    assert_eq!(ranges.iter().collect::<Vec<_>>(), ["50000-"]);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert!(!part.exists());

    // Whole but corrupt: removed, and the file fetched anew, all of it, once.
    std::fs::remove_file(&dest).unwrap();
    let mut corrupt = body.clone();
    corrupt[1234] ^= 0xff;
    std::fs::write(&part, &corrupt).unwrap();
    let (url, ranges) = serve_whole_or_416(body.clone(), 2);
    download_remote(&remote(&url, &sha), &dest).unwrap();
    assert_eq!(ranges.iter().collect::<Vec<_>>(), ["50000-", ""]);
    assert_eq!(std::fs::read(&dest).unwrap(), body);
    assert!(!part.exists());
}

#[test]
fn a_corrupt_whole_part_file_is_fetched_anew_only_once() {
    let body = b"the server's copy is not the file the checksum pins".to_vec();
    let dir = support::tempdir();
    let dest = dir.path().join("model.safetensors");
    let part = dest.with_extension("part");
    std::fs::write(&part, &body).unwrap();
    let (url, ranges) = serve_whole_or_416(body.clone(), 3); // a third request would show
    let zeros = "0".repeat(64);
    let remote = Remote {
        url: &url,
        sha256: &zeros,
        size: None,
        offline_hint: "pass --weights",
    };
    let err = download_remote(&remote, &dest).unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    assert!(!dest.exists() && !part.exists(), "nothing left behind");
    let asked: Vec<String> = ranges.try_iter().collect();
    assert_eq!(asked, [format!("{}-", body.len()), String::new()]);
}

#[test]
fn a_heatmap_grid_draws_every_cell_label_and_panel() {
    use course::common::heatmap::{Panel, heatmap_grid, show_char};
    let dir = support::tempdir();
    let path = dir.path().join("grid.svg");
    let (rows, cols) = (["a", "b"], ["x", " ", "\n"]);
    let labels = |cs: &[&str]| -> Vec<String> {
        cs.iter()
            .map(|s| show_char(s.chars().next().unwrap()))
            .collect()
    };
    // Three panels in a grid of two columns: values 0, 0.5 and 1.
    let panels: Vec<Panel> = [0.0, 0.5, 1.0]
        .iter()
        .map(|&v| Panel {
            title: format!("head {v}"),
            values: vec![v; rows.len() * cols.len()],
        })
        .collect();
    heatmap_grid(&path, "weights", &panels, &labels(&rows), &labels(&cols), 2).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    // The background, a cell per value of each panel, and the colour bar's 100 steps.
    assert_eq!(svg.matches("<rect").count(), 1 + 3 * 2 * 3 + 100, "{svg}");
    // Every text drawn: the title, the panels' titles, and each panel's row and column labels.
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .map(|t| {
            t.split_once('>')
                .unwrap()
                .1
                .split("</text>")
                .next()
                .unwrap()
                .trim()
        })
        .collect();
    for (text, times) in [
        ("weights", 1),
        ("head 0.5", 1),
        ("a", 3),
        ("x", 3),
        ("␣", 3),
        ("⏎", 3),
    ] {
        let found = texts.iter().filter(|&&t| t == text).count();
        assert_eq!(found, times, "{text:?} in {texts:?}");
    }
    // Value 0 is white and value 1 the darkest blue, as in the colour bar.
    assert!(svg.contains("#FFFFFF") && svg.contains("#081D58"), "{svg}");
}

#[test]
fn a_nan_or_an_infinity_fails_every_comparison() {
    use burn::prelude::*;
    use course::common::{max_abs_diff, max_diff, max_rel_diff, worst};
    let device = support::flex_device();
    let logits = Tensor::<2>::from_data([[1.0, -2.0], [3.0, 4.0]], &device);
    assert_eq!(max_abs_diff(&logits, &logits), 0.0);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let broken = Tensor::<2>::from_data([[1.0, bad], [3.0, 4.0]], &device);
        let all_bad = logits.clone() * bad; // every logit NaN or infinite
        for (a, b) in [(&logits, &broken), (&broken, &logits), (&broken, &broken)] {
            let diff = max_abs_diff(a, b);
            assert_eq!(diff, f32::INFINITY, "{bad} compared: {diff}");
            let passes = diff < 1e-4; // how every parity check reads
            assert!(!passes, "{bad} passes a parity check");
        }
        assert_eq!(max_abs_diff(&all_bad, &all_bad), f32::INFINITY);
        assert_eq!(max_diff(&[0.0, bad], &[0.0, 0.0]), f32::INFINITY);
        assert_eq!(max_rel_diff(&[0.0, 0.0], &[bad, 0.0]), f32::INFINITY);
    }
    assert_eq!(worst([0.1, f64::NAN, 0.2]), f64::INFINITY);
    assert_eq!(worst([0.1, 0.3, 0.2]), 0.3);
    assert_eq!(max_rel_diff(&[110.0], &[100.0]), 0.1);
}

#[test]
fn wgpu_without_a_vulkan_driver_is_a_one_line_error() {
    let dir = support::tempdir();
    let corpus = support::corpus_path();
    let out = dir.path().join("out");
    // The Vulkan loader reads its drivers from these when set: none found means no Vulkan
    // adapter (an OpenGL one may remain, which the check refuses as well).
    let hidden = [
        ("VK_ICD_FILENAMES", "/nonexistent/icd.json"),
        ("VK_DRIVER_FILES", "/nonexistent/icd.json"),
    ];
    let (code, stdout, err) = support::run_bin(
        env!("CARGO_BIN_EXE_ch01_bigram"),
        &[
            "--backend",
            "wgpu",
            "--data",
            corpus.to_str().unwrap(),
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ],
        &hidden,
    );
    assert_ne!(code, 0, "{stdout}");
    assert!(!err.contains("panicked"), "{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(errors.len(), 1, "{err}");
    assert!(errors[0].contains("--backend wgpu"), "{err}");
    assert!(
        errors[0].contains("apt-get install mesa-vulkan-drivers libvulkan1"),
        "{err}"
    );
}
