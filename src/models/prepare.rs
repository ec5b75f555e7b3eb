//! One-time preparation of verified source files into what palaver loads.

use super::{io_err, ModelSpec, ModelsError, Prepare, Result, PREPARED_GGUF, TOKENIZER_JSON};
use candle_core::quantized::{ggml_file, gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Writes the prepared files into `dir` and returns their names.
pub(super) fn prepare(spec: &ModelSpec, sources: &[PathBuf], dir: &Path) -> Result<Vec<String>> {
    let perr = |msg: String| ModelsError::Prepare { model: spec.name.clone(), msg };
    match spec.prepare {
        Prepare::Gguf | Prepare::GgufQ8 => {
            let src = &sources[0];
            let out = dir.join(PREPARED_GGUF);
            if spec.prepare == Prepare::GgufQ8 {
                requantize_to_q8(src, &out).map_err(|e| perr(e.to_string()))?;
            } else {
                fs::rename(src, &out).map_err(io_err(src))?;
            }
            tokenizer_from_gguf(&out, &dir.join(TOKENIZER_JSON)).map_err(|e| perr(e.to_string()))?;
            Ok(vec![PREPARED_GGUF.into(), TOKENIZER_JSON.into()])
        }
        Prepare::E5s1 => {
            let bin = find(sources, ".bin").ok_or_else(|| perr("no .bin source".into()))?;
            let tok = find(sources, "tokenizer.json").ok_or_else(|| perr("no tokenizer".into()))?;
            convert_e5s1(bin, dir).map_err(|e| perr(e.to_string()))?;
            fs::copy(tok, dir.join(TOKENIZER_JSON)).map_err(io_err(tok))?;
            Ok(vec!["config.json".into(), "model.safetensors".into(), TOKENIZER_JSON.into()])
        }
        Prepare::Copy => {
            let mut names = Vec::new();
            for src in sources {
                let name = src.file_name().expect("extracted file has a name").to_string_lossy().to_string();
                fs::copy(src, dir.join(&name)).map_err(io_err(src))?;
                names.push(name);
            }
            Ok(names)
        }
    }
}

fn find<'a>(sources: &'a [PathBuf], suffix: &str) -> Option<&'a PathBuf> {
    sources.iter().find(|p| p.to_string_lossy().ends_with(suffix))
}

/// candle has SIMD kernels for Q8_0 but only scalar code for Q5_0/Q5_1/Q4_1:
/// rewriting those tensors once makes prompts about 7x faster.
pub fn requantize_to_q8(src: &Path, out: &Path) -> candle_core::Result<()> {
    let mut r = BufReader::new(File::open(src)?);
    let content = gguf_file::Content::read(&mut r)?;
    // Keep the original tensor order (the info map is unordered).
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort_by_key(|n| content.tensor_infos[*n].offset);
    let mut tensors = Vec::with_capacity(names.len());
    for name in &names {
        let qt = content.tensor(&mut r, name, &Device::Cpu)?;
        let qt = match qt.dtype() {
            GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q4_1 => {
                QTensor::quantize(&qt.dequantize(&Device::Cpu)?, GgmlDType::Q8_0)?
            }
            _ => qt,
        };
        tensors.push((name.as_str(), qt));
    }
    let metadata: Vec<(&str, &gguf_file::Value)> =
        content.metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (*n, t)).collect();
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::new(File::create(&tmp)?);
    gguf_file::write(&mut w, &metadata, &refs)?;
    w.flush()?;
    drop(w);
    fs::rename(&tmp, out)?;
    Ok(())
}

/// The GGUF files ship no tokenizer.json; candle builds one from the metadata.
/// For GPT-2-style vocabularies without a known pre-tokenizer preset (SmolLM2)
/// candle falls back to a byte-level pre-tokenizer that adds a prefix space,
/// which turns "<|im_start|>user" into "<|im_start|> user" and derails the
/// chat template; GPT-2 BPE never adds one, so it is switched off here.
pub(super) fn tokenizer_from_gguf(gguf: &Path, out: &Path) -> candle_core::Result<()> {
    use candle_core::quantized::tokenizer::TokenizerFromGguf;
    let mut r = BufReader::new(File::open(gguf)?);
    let content = gguf_file::Content::read(&mut r)?;
    let tok = tokenizers::Tokenizer::from_gguf(&content)?;
    let gpt2 = content.metadata.get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).is_some_and(|m| m == "gpt2");
    let mut json: serde_json::Value = serde_json::from_str(&tok.to_string(false).map_err(candle_core::Error::wrap)?)
        .map_err(candle_core::Error::wrap)?;
    if gpt2 {
        for key in ["pre_tokenizer", "decoder"] {
            let v = &mut json[key];
            if v["type"] == "ByteLevel" {
                v["add_prefix_space"] = serde_json::Value::Bool(false);
            }
        }
    }
    fs::write(out, serde_json::to_vec(&json).map_err(candle_core::Error::wrap)?)?;
    Ok(())
}

/// Header of an E5S1 file (see ../shared/models.md for the layout).
struct E5Header {
    hidden: usize,
    layers: usize,
    heads: usize,
    ff: usize,
    vocab: usize,
    max_pos: usize,
    types: usize,
    eps: f32,
}

fn rd_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}
fn rd_u64(r: &mut impl Read) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}
fn rd_i32(r: &mut impl Read) -> std::io::Result<usize> {
    let v = rd_u32(r)? as i32;
    usize::try_from(v).map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "negative size"))
}

/// Converts multilingual-e5-small from E5S1 into the HF BERT layout that
/// `candle_transformers::models::bert::BertModel` loads.
pub fn convert_e5s1(bin: &Path, dir: &Path) -> candle_core::Result<()> {
    let bad = |m: &str| candle_core::Error::Msg(format!("E5S1: {m}"));
    let mut r = BufReader::new(File::open(bin)?);
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)?;
    if &magic != b"E5S1" {
        return Err(bad("bad magic"));
    }
    let _version = rd_u32(&mut r)?;
    let h = E5Header {
        hidden: rd_i32(&mut r)?,
        layers: rd_i32(&mut r)?,
        heads: rd_i32(&mut r)?,
        ff: rd_i32(&mut r)?,
        vocab: rd_i32(&mut r)?,
        max_pos: rd_i32(&mut r)?,
        types: rd_i32(&mut r)?,
        eps: f32::from_bits(rd_u32(&mut r)?),
    };
    let _block = rd_i32(&mut r)?;
    // Vocabulary: skipped, the HF tokenizer.json from the second package is
    // identical id for id.
    let n = rd_i32(&mut r)?;
    for _ in 0..4 {
        rd_u32(&mut r)?;
    }
    let blob = rd_u64(&mut r)?;
    let skip = (n as u64 + 1) * 4 + n as u64 * 4 + blob;
    r.seek(SeekFrom::Current(skip as i64))?;
    // Normaliser: count, byte length, bytes.
    let _entries = rd_u32(&mut r)?;
    let norm_len = rd_u32(&mut r)?;
    r.seek(SeekFrom::Current(norm_len as i64))?;

    let count = rd_i32(&mut r)?;
    let mut dirents = Vec::with_capacity(count);
    for _ in 0..count {
        let mut l = [0u8; 2];
        r.read_exact(&mut l)?;
        let mut name = vec![0u8; u16::from_le_bytes(l) as usize];
        r.read_exact(&mut name)?;
        let mut dt = [0u8; 1];
        r.read_exact(&mut dt)?;
        let elems = rd_u32(&mut r)? as usize;
        let offset = rd_u64(&mut r)?;
        let len = rd_u64(&mut r)? as usize;
        let name = String::from_utf8(name).map_err(|_| bad("tensor name is not UTF-8"))?;
        dirents.push((name, dt[0], elems, offset, len));
    }

    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (name, dtype, elems, offset, len) in dirents {
        let (hf, shape) = hf_name(&name, &h).ok_or_else(|| bad(&format!("unknown tensor {name}")))?;
        if shape.iter().product::<usize>() != elems {
            return Err(bad(&format!("{name}: {elems} elements, expected {shape:?}")));
        }
        let mut bytes = vec![0u8; len];
        r.seek(SeekFrom::Start(offset))?;
        r.read_exact(&mut bytes)?;
        let t = match dtype {
            0 => {
                let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
                Tensor::from_vec(v, shape, &Device::Cpu)?
            }
            1 => ggml_file::qtensor_from_ggml(GgmlDType::Q4_0, &bytes, shape, &Device::Cpu)?
                .dequantize(&Device::Cpu)?,
            d => return Err(bad(&format!("{name}: unknown dtype {d}"))),
        };
        tensors.insert(hf, t.to_dtype(DType::F32)?);
    }
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "vocab_size": h.vocab,
        "hidden_size": h.hidden,
        "num_hidden_layers": h.layers,
        "num_attention_heads": h.heads,
        "intermediate_size": h.ff,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": h.max_pos,
        "type_vocab_size": h.types,
        "initializer_range": 0.02,
        "layer_norm_eps": h.eps,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "use_cache": true,
        "classifier_dropout": null
    });
    fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&config).expect("json"))?;
    Ok(())
}

/// E5S1 tensor name -> (HF BERT name, shape).
fn hf_name(name: &str, h: &E5Header) -> Option<(String, Vec<usize>)> {
    let (d, f) = (h.hidden, h.ff);
    let fixed = match name {
        "emb.word" => Some(("embeddings.word_embeddings.weight", vec![h.vocab, d])),
        "emb.pos" => Some(("embeddings.position_embeddings.weight", vec![h.max_pos, d])),
        "emb.type" => Some(("embeddings.token_type_embeddings.weight", vec![h.types, d])),
        "emb.ln.w" => Some(("embeddings.LayerNorm.weight", vec![d])),
        "emb.ln.b" => Some(("embeddings.LayerNorm.bias", vec![d])),
        _ => None,
    };
    if let Some((n, s)) = fixed {
        return Some((n.to_string(), s));
    }
    let rest = name.strip_prefix('l')?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let p = format!("encoder.layer.{layer}");
    let (hf, shape) = match rest {
        "q.w" => ("attention.self.query.weight", vec![d, d]),
        "q.b" => ("attention.self.query.bias", vec![d]),
        "k.w" => ("attention.self.key.weight", vec![d, d]),
        "k.b" => ("attention.self.key.bias", vec![d]),
        "v.w" => ("attention.self.value.weight", vec![d, d]),
        "v.b" => ("attention.self.value.bias", vec![d]),
        "ao.w" => ("attention.output.dense.weight", vec![d, d]),
        "ao.b" => ("attention.output.dense.bias", vec![d]),
        "aln.w" => ("attention.output.LayerNorm.weight", vec![d]),
        "aln.b" => ("attention.output.LayerNorm.bias", vec![d]),
        "fi.w" => ("intermediate.dense.weight", vec![f, d]),
        "fi.b" => ("intermediate.dense.bias", vec![f]),
        "fo.w" => ("output.dense.weight", vec![d, f]),
        "fo.b" => ("output.dense.bias", vec![d]),
        "oln.w" => ("output.LayerNorm.weight", vec![d]),
        "oln.b" => ("output.LayerNorm.bias", vec![d]),
        _ => return None,
    };
    Some((format!("{p}.{hf}"), shape))
}
