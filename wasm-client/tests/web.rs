//! The JS API of sightline-wasm, run in headless Chromium by wasm-bindgen-test
//! (`scripts/wasm-test.sh`): orientation, estimates against the core, hostile inputs.
#![cfg(target_arch = "wasm32")]

use std::io::Cursor;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use js_sys::{Array, Reflect, Uint8Array};
use sightline_core::pricing::{
    text_tokens, EstimateParams, PriceTable, DEFAULT_PROMPT, PROMPT_OVERHEAD_TOKENS,
};
use sightline_core::Detail;
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const ROCKET: &[u8] = include_bytes!("../../tests/fixtures/samples/rocket.jpg");
const COFFEE: &[u8] = include_bytes!("../../tests/fixtures/samples/coffee.png");
const PHONE: &[u8] = include_bytes!("../../tests/fixtures/large/phone12mp.jpg");

fn get(v: &JsValue, key: &str) -> JsValue {
    Reflect::get(v, &JsValue::from_str(key)).unwrap()
}
fn num(v: &JsValue, key: &str) -> f64 {
    get(v, key)
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number"))
}
fn string(v: &JsValue, key: &str) -> String {
    get(v, key)
        .as_string()
        .unwrap_or_else(|| panic!("{key} is not a string"))
}

/// `{maxEdge?, models?}` as a JS object.
fn options(max_edge: Option<u32>, models: &[&str]) -> JsValue {
    let o = js_sys::Object::new();
    if let Some(e) = max_edge {
        Reflect::set(&o, &"maxEdge".into(), &e.into()).unwrap();
    }
    if !models.is_empty() {
        let a: Array = models.iter().map(|m| JsValue::from_str(m)).collect();
        Reflect::set(&o, &"models".into(), &a).unwrap();
    }
    o.into()
}

fn js_models(models: &[&str]) -> JsValue {
    models
        .iter()
        .map(|m| JsValue::from_str(m))
        .collect::<Array>()
        .into()
}

/// The thrown value of a failed call: a JS Error with `code` and `message`.
fn error_code(r: Result<JsValue, JsValue>) -> (String, String) {
    let err = match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    };
    assert!(
        err.is_instance_of::<js_sys::Error>(),
        "not an Error: {err:?}"
    );
    let e: js_sys::Error = err.clone().unchecked_into();
    (string(&err, "code"), String::from(e.message()))
}

fn encode(img: &DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, fmt).unwrap();
    out.into_inner()
}

fn all_model_ids() -> Vec<String> {
    PriceTable::builtin()
        .models()
        .map(|m| m.id.clone())
        .collect()
}

// ---------------------------------------------------------------- orientation

/// What a camera stores for EXIF orientation `o` of an upright image.
fn store_as(img: &RgbImage, o: u8) -> RgbImage {
    use image::imageops::*;
    match o {
        1 => img.clone(),
        2 => flip_horizontal(img),
        3 => rotate180(img),
        4 => flip_vertical(img),
        5 => rotate270(&flip_horizontal(img)),
        6 => rotate270(img),
        7 => rotate90(&flip_horizontal(img)),
        8 => rotate90(img),
        _ => unreachable!(),
    }
}

/// Insert a minimal APP1 EXIF segment with an Orientation tag after SOI.
fn with_exif_orientation(jpeg: &[u8], o: u8) -> Vec<u8> {
    let mut tiff = vec![b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1];
    tiff.extend_from_slice(&[0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, o, 0, 0]);
    tiff.extend_from_slice(&[0, 0, 0, 0]);
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let len = (app1.len() + 2) as u16;
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[wasm_bindgen_test]
fn orientations_one_to_eight_come_out_upright() {
    // 40×20 upright: a red 10×10 top-left corner on blue.
    let mut upright = RgbImage::from_pixel(40, 20, Rgb([0, 0, 255]));
    for y in 0..10 {
        for x in 0..10 {
            upright.put_pixel(x, y, Rgb([255, 0, 0]));
        }
    }
    for o in 1u8..=8 {
        let stored = store_as(&upright, o);
        let jpeg = with_exif_orientation(
            &encode(&DynamicImage::ImageRgb8(stored), ImageFormat::Jpeg),
            o,
        );
        let out = sightline_wasm::prepare_image(&jpeg, JsValue::UNDEFINED)
            .unwrap_or_else(|e| panic!("orientation {o}: {e:?}"));
        assert_eq!(num(&out, "orientation"), f64::from(o));
        assert_eq!(
            (num(&out, "width"), num(&out, "height")),
            (40.0, 20.0),
            "orientation {o}"
        );
        assert_eq!(
            (num(&out, "originalWidth"), num(&out, "originalHeight")),
            (40.0, 20.0)
        );
        let bytes = get(&out, "jpeg").dyn_into::<Uint8Array>().unwrap().to_vec();
        assert_eq!(num(&out, "bytesAfter") as usize, bytes.len());
        assert!(
            !bytes.windows(4).any(|w| w == b"Exif"),
            "orientation {o}: EXIF kept"
        );
        let img = image::load_from_memory(&bytes).unwrap().into_rgb8();
        let tl = img.get_pixel(2, 2);
        assert!(
            tl[0] > 200 && tl[2] < 60,
            "orientation {o}: top-left is {tl:?}"
        );
        let br = img.get_pixel(37, 17);
        assert!(
            br[2] > 200 && br[0] < 60,
            "orientation {o}: bottom-right is {br:?}"
        );
    }
}

/// `planImage` (the first-load module's header reading) says what `prepareImage` (the server's
/// decoders) does: sizes, orientation, and the same estimates through `estimateImage`.
#[wasm_bindgen_test]
fn plan_image_gives_the_size_and_estimates_prepare_image_gives() {
    let upright = RgbImage::from_fn(300, 120, |x, y| Rgb([x as u8, y as u8, 90]));
    let mut inputs: Vec<Vec<u8>> = (1u8..=8)
        .map(|o| {
            with_exif_orientation(
                &encode(
                    &DynamicImage::ImageRgb8(store_as(&upright, o)),
                    ImageFormat::Jpeg,
                ),
                o,
            )
        })
        .collect();
    inputs.push(PHONE.to_vec());
    inputs.push(COFFEE.to_vec());
    inputs.push(encode(
        &DynamicImage::ImageRgb8(upright.clone()),
        ImageFormat::WebP,
    ));
    let models: Vec<String> = all_model_ids();
    let model_refs: Vec<&str> = models.iter().map(String::as_str).collect();
    for (i, bytes) in inputs.iter().enumerate() {
        let opts = options(Some(100), &model_refs);
        let plan = sightline_wasm::plan_image(bytes, opts.clone()).unwrap();
        assert_eq!(string(&plan, "route"), "platform", "input {i}");
        let out = sightline_wasm::prepare_image(bytes, opts.clone()).unwrap();
        for (p, o) in [
            ("outWidth", "width"),
            ("outHeight", "height"),
            ("width", "originalWidth"),
            ("height", "originalHeight"),
            ("orientation", "orientation"),
        ] {
            assert_eq!(num(&plan, p), num(&out, o), "input {i}: {p} vs {o}");
        }
        assert_eq!(string(&plan, "format"), string(&out, "format"));
        let est = sightline_wasm::estimate_image(
            num(&plan, "outWidth") as u32,
            num(&plan, "outHeight") as u32,
            num(&plan, "width") as u32,
            num(&plan, "height") as u32,
            opts,
        )
        .unwrap();
        let want = js_sys::JSON::stringify(&get(&out, "estimates")).unwrap();
        assert_eq!(
            String::from(js_sys::JSON::stringify(&est).unwrap()),
            String::from(want),
            "input {i}"
        );
    }
    // The server's refusals come from the header, with its codes.
    let cut = &PHONE[..PHONE.len() / 2];
    let (code, _) = error_code(sightline_wasm::plan_image(cut, JsValue::UNDEFINED));
    assert_eq!(code, "truncated");
    let (code, _) = error_code(sightline_wasm::plan_image(b"<svg/>", JsValue::UNDEFINED));
    assert_eq!(code, "svg_unsupported");
}

#[wasm_bindgen_test]
fn phone_photo_is_portrait_768_by_1024() {
    let out =
        sightline_wasm::prepare_image(PHONE, options(Some(1024), &["gpt-4o", "gpt-4.1-mini"]))
            .unwrap();
    assert_eq!((num(&out, "width"), num(&out, "height")), (768.0, 1024.0));
    assert_eq!(
        (num(&out, "originalWidth"), num(&out, "originalHeight")),
        (3024.0, 4032.0)
    );
    assert_eq!(num(&out, "orientation"), 6.0);
    assert_eq!(num(&out, "bytesBefore") as usize, PHONE.len());
    assert_eq!(string(&out, "format"), "jpg");
    assert_eq!(string(&out, "sha256").len(), 64);
    // The same bytes as the core gives (one implementation).
    let native = sightline_core::prepare(PHONE, &Default::default()).unwrap();
    assert_eq!(string(&out, "sha256"), native.sha256);
    let est = Array::from(&get(&out, "estimates"));
    assert_eq!(est.length(), 2);
    let gpt4o = est.get(0);
    assert_eq!(string(&gpt4o, "model"), "gpt-4o");
    // 768×1024 → 2×2 tiles: 85 + 4·170.
    assert_eq!(num(&gpt4o, "imageTokens"), 765.0);
    let e = PriceTable::builtin()
        .estimate("gpt-4o", 3024, 4032, &EstimateParams::default())
        .unwrap();
    assert_eq!(num(&gpt4o, "originalTokens"), e.tokens as f64);
    assert_eq!(num(&gpt4o, "originalCostUsd"), e.cost_usd);
}

// ---------------------------------------------------------------- estimates

#[wasm_bindgen_test]
fn estimates_equal_the_core() {
    let table = PriceTable::builtin();
    let ids = all_model_ids();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let params = EstimateParams::default();
    for (w, h) in [
        (1, 1),
        (200, 200),
        (300, 200),
        (512, 512),
        (768, 1024),
        (1024, 1024),
        (1092, 1092),
        (1800, 2400),
        (2048, 4096),
        (3024, 4032),
        (5640, 3172),
    ] {
        let got = Array::from(
            &sightline_wasm::estimate(w, h, js_models(&id_refs), JsValue::UNDEFINED).unwrap(),
        );
        assert_eq!(got.length() as usize, ids.len());
        for (i, id) in ids.iter().enumerate() {
            let g = got.get(i as u32);
            let want = table.estimate(id, w, h, &params).unwrap();
            assert_eq!(string(&g, "model"), *id);
            assert_eq!(
                num(&g, "imageTokens"),
                want.image_tokens as f64,
                "{id} {w}×{h}"
            );
            assert_eq!(num(&g, "tokens"), want.tokens as f64, "{id} {w}×{h}");
            assert_eq!(num(&g, "inputTokens"), want.input_tokens as f64);
            assert_eq!(num(&g, "outputTokens"), want.output_tokens as f64);
            assert_eq!(num(&g, "costUsd"), want.cost_usd, "{id} {w}×{h}");
            assert_eq!(
                num(&g, "batchCostUsd"),
                table.batch_cost_usd(&want).unwrap(),
                "{id} {w}×{h}"
            );
            assert_eq!(string(&g, "priceVersion"), table.version());
        }
    }
}

#[wasm_bindgen_test]
fn known_values() {
    let image_tokens = |model: &str, w, h| {
        num(
            &Array::from(
                &sightline_wasm::estimate(w, h, js_models(&[model]), JsValue::UNDEFINED).unwrap(),
            )
            .get(0),
            "imageTokens",
        )
    };
    // OpenAI's worked examples and the other providers' published figures.
    assert_eq!(image_tokens("gpt-4o", 1024, 1024), 765.0);
    assert_eq!(image_tokens("gpt-4o", 2048, 4096), 1105.0);
    assert_eq!(image_tokens("gpt-4o", 300, 200), 255.0);
    assert_eq!(
        image_tokens("gpt-4.1-mini", 1024, 1024),
        (1024.0f64 * 1.62).ceil()
    );
    assert_eq!(
        image_tokens("gpt-4.1-nano", 1800, 2400),
        (1452.0f64 * 2.46).ceil()
    );
    assert_eq!(image_tokens("claude-sonnet-4-5", 1000, 1000), 1334.0);
    assert_eq!(image_tokens("gemini-2.5-pro", 1024, 768), 516.0);
    // gpt-4o 1024×1024 high: (765 + the server's default prompt) × $2.50/M + 250 out × $10/M:
    // the widget counts the prompt the server sends, not a guess of its own.
    let prompt = (text_tokens(DEFAULT_PROMPT) + PROMPT_OVERHEAD_TOKENS) as f64;
    let e = Array::from(
        &sightline_wasm::estimate(1024, 1024, js_models(&["gpt-4o"]), JsValue::UNDEFINED).unwrap(),
    )
    .get(0);
    assert_eq!(num(&e, "tokens"), 765.0 + prompt + 250.0);
    assert!((num(&e, "costUsd") - ((765.0 + prompt) * 2.5 + 250.0 * 10.0) / 1e6).abs() < 1e-12);
    // Low detail and custom prompt/output through the params object.
    let params = js_sys::Object::new();
    Reflect::set(&params, &"detail".into(), &"low".into()).unwrap();
    Reflect::set(&params, &"promptTokens".into(), &0.into()).unwrap();
    Reflect::set(&params, &"expectedOutputTokens".into(), &0.into()).unwrap();
    let low = Array::from(
        &sightline_wasm::estimate(1024, 1024, js_models(&["gpt-4o"]), params.into()).unwrap(),
    )
    .get(0);
    assert_eq!(num(&low, "imageTokens"), 85.0);
    assert_eq!(num(&low, "tokens"), 85.0);
    let want = PriceTable::builtin()
        .estimate(
            "gpt-4o",
            1024,
            1024,
            &EstimateParams {
                detail: Detail::Low,
                prompt_tokens: 0,
                expected_output_tokens: 0,
            },
        )
        .unwrap();
    assert_eq!(num(&low, "costUsd"), want.cost_usd);
    // A comma list works too, and the default is gpt-4.1-mini + gpt-4o.
    let two = Array::from(
        &sightline_wasm::estimate(
            10,
            10,
            JsValue::from_str("gpt-4o, gemini-2.5-flash"),
            JsValue::UNDEFINED,
        )
        .unwrap(),
    );
    assert_eq!(two.length(), 2);
    let dflt = Array::from(
        &sightline_wasm::estimate(10, 10, JsValue::UNDEFINED, JsValue::UNDEFINED).unwrap(),
    );
    assert_eq!(string(&dflt.get(0), "model"), "gpt-4.1-mini");
    assert_eq!(string(&dflt.get(1), "model"), "gpt-4o");
}

#[wasm_bindgen_test]
fn prepare_estimates_match_the_core_on_the_output_size() {
    let ids = all_model_ids();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let out = sightline_wasm::prepare_image(ROCKET, options(Some(256), &id_refs)).unwrap();
    let (w, h) = (num(&out, "width") as u32, num(&out, "height") as u32);
    assert_eq!(w.max(h), 256);
    let (ow, oh) = (
        num(&out, "originalWidth") as u32,
        num(&out, "originalHeight") as u32,
    );
    let est = Array::from(&get(&out, "estimates"));
    for (i, id) in ids.iter().enumerate() {
        let e = est.get(i as u32);
        let want = PriceTable::builtin()
            .estimate(id, w, h, &EstimateParams::default())
            .unwrap();
        let orig = PriceTable::builtin()
            .estimate(id, ow, oh, &EstimateParams::default())
            .unwrap();
        assert_eq!(num(&e, "tokens"), want.tokens as f64, "{id}");
        assert_eq!(num(&e, "costUsd"), want.cost_usd, "{id}");
        assert_eq!(num(&e, "originalTokens"), orig.tokens as f64, "{id}");
        assert_eq!(num(&e, "originalCostUsd"), orig.cost_usd, "{id}");
        let table = PriceTable::builtin();
        assert_eq!(
            num(&e, "batchCostUsd"),
            table.batch_cost_usd(&want).unwrap(),
            "{id}"
        );
        assert_eq!(
            num(&e, "originalBatchCostUsd"),
            table.batch_cost_usd(&orig).unwrap(),
            "{id}"
        );
    }
}

#[wasm_bindgen_test]
fn models_lists_the_price_table() {
    let m = sightline_wasm::models();
    assert_eq!(string(&m, "version"), PriceTable::builtin().version());
    let list = Array::from(&get(&m, "models"));
    assert_eq!(list.length() as usize, all_model_ids().len());
    let gpt4o = list.iter().find(|x| string(x, "id") == "gpt-4o").unwrap();
    assert_eq!(num(&gpt4o, "inputPerMtok"), 2.5);
    assert_eq!(num(&gpt4o, "outputPerMtok"), 10.0);
    assert_eq!(string(&gpt4o, "provider"), "openai");
    assert!(string(&gpt4o, "source").starts_with("https://"));
    assert_eq!(string(&gpt4o, "imageRule"), "openai_tile");
    assert_eq!(num(&gpt4o, "batchInputPerMtok"), 1.25);
    let v = sightline_wasm::version();
    assert_eq!(
        get(&v, "simd").as_bool(),
        Some(cfg!(target_feature = "simd128"))
    );
}

// ---------------------------------------------------------------- hostile inputs

/// A PNG whose IHDR claims `w`×`h` pixels, with an empty IDAT.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png.extend_from_slice(&13u32.to_be_bytes());
    png.extend_from_slice(&ihdr);
    png.extend_from_slice(&crc32(&ihdr).to_be_bytes());
    let mut idat = b"IDAT".to_vec();
    idat.extend_from_slice(&[0x78, 0x9C, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    png.extend_from_slice(&8u32.to_be_bytes());
    png.extend_from_slice(&idat);
    png.extend_from_slice(&crc32(&idat).to_be_bytes());
    png
}

#[wasm_bindgen_test]
fn hostile_inputs_throw_errors_with_codes() {
    let none = JsValue::UNDEFINED;
    let (code, msg) = error_code(sightline_wasm::prepare_image(&[], none.clone()));
    assert_eq!(code, "empty", "{msg}");
    let (code, msg) = error_code(sightline_wasm::prepare_image(
        b"hello, world: just text",
        none.clone(),
    ));
    assert_eq!(code, "not_an_image");
    assert!(msg.contains("not an image"), "{msg}");
    let svg = b"<?xml version=\"1.0\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"10\" height=\"10\"/>";
    let (code, msg) = error_code(sightline_wasm::prepare_image(svg, none.clone()));
    assert_eq!(code, "svg_unsupported");
    assert!(msg.contains("SVG"), "{msg}");
    let (code, _) = error_code(sightline_wasm::prepare_image(
        &ROCKET[..ROCKET.len() / 2],
        none.clone(),
    ));
    assert_eq!(code, "truncated");
    assert!(sightline_wasm::prepare_image(&COFFEE[..COFFEE.len() / 3], none.clone()).is_err());
    let (code, _) = error_code(sightline_wasm::prepare_image(
        b"BM\x00\x00\x00\x00",
        none.clone(),
    ));
    assert_eq!(code, "unsupported_format");
}

#[wasm_bindgen_test]
fn decompression_bombs_are_refused_before_decoding() {
    // A header claiming 100000 × 100000 (10 GP). Natively the core says too_many_pixels; on
    // wasm32 the PNG decoder's 32-bit buffer size overflows first and the core maps that to
    // memory_limit. Either way it is refused from the header, before any large allocation.
    let (code, msg) = error_code(sightline_wasm::prepare_image(
        &png_header(100_000, 100_000),
        JsValue::UNDEFINED,
    ));
    assert!(
        code == "too_many_pixels" || code == "memory_limit",
        "{code}: {msg}"
    );
    // Within 32 bits: 20000 × 20000 = 400 MP is over the default 100 MP budget.
    let (code, msg) = error_code(sightline_wasm::prepare_image(
        &png_header(20_000, 20_000),
        JsValue::UNDEFINED,
    ));
    assert_eq!(code, "too_many_pixels", "{msg}");
    assert!(msg.contains("20000×20000"), "{msg}");
    // A real image over a caller's pixel budget.
    let o = js_sys::Object::new();
    Reflect::set(&o, &"maxPixels".into(), &10_000.into()).unwrap();
    let (code, _) = error_code(sightline_wasm::prepare_image(COFFEE, o.into()));
    assert_eq!(code, "too_many_pixels");
    // And over a byte budget.
    let o = js_sys::Object::new();
    Reflect::set(&o, &"maxInputBytes".into(), &1000.into()).unwrap();
    let (code, _) = error_code(sightline_wasm::prepare_image(ROCKET, o.into()));
    assert_eq!(code, "too_large");
}

#[wasm_bindgen_test]
fn bad_options_and_models_are_errors() {
    let o = js_sys::Object::new();
    Reflect::set(&o, &"quality".into(), &0.into()).unwrap();
    let (code, _) = error_code(sightline_wasm::prepare_image(ROCKET, o.into()));
    assert_eq!(code, "invalid_options");
    let o = js_sys::Object::new();
    Reflect::set(&o, &"maxEdge".into(), &JsValue::from_str("big")).unwrap();
    let (code, _) = error_code(sightline_wasm::prepare_image(ROCKET, o.into()));
    assert_eq!(code, "invalid_options");
    let (code, msg) = error_code(sightline_wasm::prepare_image(
        ROCKET,
        options(None, &["gpt-99"]),
    ));
    assert_eq!(code, "unknown_model");
    assert!(msg.contains("gpt-99") && msg.contains("gpt-4o"), "{msg}");
    let r = sightline_wasm::estimate(10, 10, js_models(&["nope"]), JsValue::UNDEFINED)
        .map(JsValue::from);
    assert_eq!(error_code(r).0, "unknown_model");
}

// ---------------------------------------------------------------- colour management

const P3_PATCHES: &[u8] = include_bytes!("../../tests/fixtures-icc/p3_patches.png");

#[wasm_bindgen_test]
fn display_p3_images_come_out_converted_to_srgb() {
    // Linear Display P3 → linear sRGB (both D65), the published matrix.
    const P3_TO_SRGB: [[f64; 3]; 3] = [
        [1.2249, -0.2247, 0.0],
        [-0.0420, 1.0419, 0.0],
        [-0.0197, -0.0786, 1.0979],
    ];
    let decode = |c: u8| {
        let v = f64::from(c) / 255.0;
        if v <= 0.04045 {
            v / 12.92
        } else {
            ((v + 0.055) / 1.055).powf(2.4)
        }
    };
    let encode = |v: f64| {
        let v = v.clamp(0.0, 1.0);
        let e = if v <= 0.0031308 {
            12.92 * v
        } else {
            1.055 * v.powf(1.0 / 2.4) - 0.055
        };
        (e * 255.0).round() as u8
    };
    let o = js_sys::Object::new();
    Reflect::set(&o, &"quality".into(), &100.into()).unwrap();
    let out = sightline_wasm::prepare_image(P3_PATCHES, o.into()).unwrap();
    let jpeg = get(&out, "jpeg").unchecked_into::<Uint8Array>().to_vec();
    let img = image::load_from_memory(&jpeg).unwrap().into_rgb8();
    let src = image::load_from_memory(P3_PATCHES).unwrap().into_rgb8();
    assert_eq!(img.dimensions(), src.dimensions());
    // Patch centres (48-px patches): 75 % red, a pastel green, a skin tone, foliage, and two
    // saturated colours (orange, yellow-green) outside sRGB.
    for (col, row) in [(0, 1), (1, 2), (0, 3), (4, 3), (0, 5), (2, 5)] {
        let (x, y) = (col * 48 + 24, row * 48 + 24);
        let p3 = src.get_pixel(x, y).0;
        let lin = p3.map(decode);
        let want = P3_TO_SRGB.map(|r| encode(r[0] * lin[0] + r[1] * lin[1] + r[2] * lin[2]));
        let got = img.get_pixel(x, y).0;
        assert!(
            got.iter().zip(want).all(|(g, w)| g.abs_diff(w) <= 4),
            "patch {col},{row}: P3 {p3:?} → {got:?}, want {want:?}"
        );
        // And visibly not the unconverted value.
        assert!(
            got.iter().zip(p3).any(|(g, s)| g.abs_diff(s) >= 8),
            "patch {col},{row}: {got:?} is still the P3 code value {p3:?}"
        );
    }
}
