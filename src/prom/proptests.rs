use super::samples::parse_line;
use super::tests::{GO_METRICS, PYTHON_METRICS};
use super::*;
use proptest::prelude::*;

/// Name, decoded labels, value, and the byte offset just after the line's newline.
type Indexed = (String, Vec<(String, String)>, f64, usize);

/// Every sample of a fixture.
fn index(body: &str) -> Vec<Indexed> {
    let mut out = Vec::new();
    let mut offset = 0;
    for line in body.split_inclusive('\n') {
        offset += line.len();
        if let Ok(Some(s)) = parse_line(line.trim_end_matches('\n').as_bytes(), 0) {
            let labels = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.decoded().into_owned()))
                .collect();
            out.push((s.name.to_string(), labels, s.value, offset));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        for s in samples(&bytes).flatten() {
            let _ = s.labels.iter().count();
        }
        let _ = find_gauge(&bytes, "a", &[("b", "c")]);
        if let Ok(text) = std::str::from_utf8(&bytes) {
            let _ = Selector::parse(text);
        }
    }

    #[test]
    fn exposition_like_noise_never_panics(
        parts in proptest::collection::vec(
            prop_oneof![
                Just("a"), Just("{"), Just("}"), Just("\""), Just("\\"), Just("="),
                Just(","), Just(" "), Just("\t"), Just("\n"), Just("\r"), Just("#"),
                Just("1"), Just("e+"), Just("NaN"), Just("+Inf"), Just("x=\""), Just("é"),
            ],
            0..64,
        )
    ) {
        let body: String = parts.concat();
        for s in samples(body.as_bytes()).flatten() {
            for (_, v) in s.labels.iter() {
                let _ = v.decoded();
                let _ = v.matches("x");
            }
        }
        let _ = find_gauge(body.as_bytes(), "a", &[("x", "1")]);
        let _ = Selector::parse(&body);
    }

    #[test]
    fn truncation_never_yields_a_different_value(cut in 0usize..8192, which in 0usize..1000, python in any::<bool>()) {
        let body = if python { PYTHON_METRICS } else { GO_METRICS };
        let cut = cut % (body.len() + 1);
        let idx = index(body);
        let (name, labels, value, end) = &idx[which % idx.len()];
        let wanted: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let got = find_gauge(&body.as_bytes()[..cut], name, &wanted);
        if *end <= cut {
            // The whole line survived: the value must be there.
            prop_assert!(got.as_ref().is_ok_and(|v| v.to_bits() == value.to_bits()), "{got:?}");
        } else {
            // Cut before or inside the line: never a value.
            prop_assert!(got.is_err(), "{got:?} for {name} cut at {cut}");
        }
    }

    #[test]
    fn numbers_round_trip(v in any::<f64>().prop_filter("finite", |v| v.is_finite())) {
        let body = format!("m {v:e}\n");
        prop_assert_eq!(find_gauge(body.as_bytes(), "m", &[]), Ok(v));
    }
}
