//! The encoder on the real multilingual-e5-small weights: a text embedded in a
//! padded batch equals the text embedded alone, concurrent callers share
//! forward passes, and translations land close together.

use crate::common;

use palaver::encoder::dot;

const TEXTS: &[&str] = &[
    "where is my order?",
    "Olá, paguei o boleto ontem mas o pedido continua aparecendo como aguardando pagamento no aplicativo, podem verificar?",
    "Здравствуйте, я хочу отменить подписку",
    "नमस्ते, मेरा रिफंड अभी तक नहीं आया",
    "hi",
    "Hola, me cobraron dos veces la misma compra en la tarjeta y necesito que me devuelvan uno de los cargos lo antes posible por favor",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_embeddings_equal_single_ones() {
    let enc = common::encoder();
    enc.wait_loaded().await;
    let mut alone = Vec::new();
    for t in TEXTS {
        let (e, timings) = enc.encode(vec![t.to_string()]).await.unwrap();
        assert_eq!(timings.batch_size, 1);
        let norm: f32 = dot(&e[0].embedding, &e[0].embedding);
        assert!((norm - 1.0).abs() < 1e-4, "not unit length: {norm}");
        alone.push(e.into_iter().next().unwrap().embedding);
    }
    // Every text again, 4 copies each, from concurrent callers: padded batches.
    let before = enc.stats();
    let calls: Vec<_> = (0..4)
        .flat_map(|_| TEXTS.iter().map(|t| t.to_string()))
        .map(|t| {
            let enc = enc.clone();
            tokio::spawn(async move { enc.encode(vec![t]).await.unwrap() })
        })
        .collect();
    let mut max_batch = 0;
    for (i, call) in calls.into_iter().enumerate() {
        let (e, timings) = call.await.unwrap();
        max_batch = max_batch.max(timings.batch_size);
        let cos = dot(&e[0].embedding, &alone[i % TEXTS.len()]);
        assert!(cos > 0.999, "text {} batched vs alone: cosine {cos}", i % TEXTS.len());
    }
    let after = enc.stats();
    assert!(max_batch > 1, "concurrent callers never shared a batch");
    assert!(after.batches - before.batches < 24, "{before:?} -> {after:?}");
    // One call with many texts is batched as well.
    let (many, timings) = enc.encode(TEXTS.iter().map(|t| t.to_string()).collect()).await.unwrap();
    assert_eq!(timings.batch_size, TEXTS.len());
    for (m, a) in many.iter().zip(&alone) {
        assert!(dot(&m.embedding, a) > 0.999);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn translations_are_closer_than_unrelated_messages() {
    let enc = common::encoder();
    enc.wait_loaded().await;
    let texts = ["I want a refund for my order", "quero o reembolso do meu pedido", "верните деньги за мой заказ", "what time does the football match start"];
    let (e, _) = enc.encode(texts.iter().map(|t| t.to_string()).collect()).await.unwrap();
    let (pt, ru, other) = (dot(&e[0].embedding, &e[1].embedding), dot(&e[0].embedding, &e[2].embedding), dot(&e[0].embedding, &e[3].embedding));
    assert!(pt > other + 0.05 && ru > other + 0.05, "pt {pt}, ru {ru}, unrelated {other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_texts_are_cut_at_the_token_limit() {
    let enc = common::encoder();
    enc.wait_loaded().await;
    let long = "my parcel is late ".repeat(400);
    let (e, _) = enc.encode(vec![long]).await.unwrap();
    assert_eq!(e[0].tokens, enc.max_tokens());
    assert_eq!(e[0].embedding.len(), 384);
}

/// palaver's packed forward pass against candle's reference `BertModel`
/// (padded batch, masked mean pooling) on the same weights.
#[test]
fn packed_forward_equals_candles_bert() {
    use candle_core::{DType, Device, Tensor};
    use candle_transformers::models::bert::{BertModel, Config};
    use palaver::encoder::{Encoder, Precision};
    let (files, ids) = encoder_files_and_ids();
    let seqs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let ours = Encoder::load(&files, &Device::Cpu, Precision::F32).unwrap().embed(&seqs).unwrap();

    let cfg: Config = serde_json::from_str(&std::fs::read_to_string(&files.config).unwrap()).unwrap();
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[&files.weights], DType::F32, &Device::Cpu).unwrap() };
    let reference = BertModel::load(vb, &cfg).unwrap();
    let width = seqs.iter().map(|s| s.len()).max().unwrap();
    let mut flat = vec![0u32; seqs.len() * width];
    let mut mask = vec![0f32; seqs.len() * width];
    for (i, s) in seqs.iter().enumerate() {
        flat[i * width..i * width + s.len()].copy_from_slice(s);
        mask[i * width..i * width + s.len()].fill(1.0);
    }
    let ids = Tensor::from_vec(flat, (seqs.len(), width), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(mask, (seqs.len(), width), &Device::Cpu).unwrap();
    let hidden = reference.forward(&ids, &ids.zeros_like().unwrap(), Some(&mask)).unwrap();
    let m = mask.unsqueeze(2).unwrap();
    let mean = hidden.broadcast_mul(&m).unwrap().sum(1).unwrap().broadcast_div(&m.sum(1).unwrap()).unwrap();
    let rows = mean.to_vec2::<f32>().unwrap();
    for (i, (a, r)) in ours.iter().zip(&rows).enumerate() {
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt();
        let cos = dot(a, r) / norm;
        assert!(cos > 0.9999, "text {i}: cosine {cos} against candle's BertModel");
    }
}

/// The int8 dense layers (AVX-512 VNNI CPUs) stay close to the f32 reference.
#[test]
fn int8_embeddings_stay_close_to_f32() {
    use candle_core::Device;
    use palaver::encoder::{Encoder, Precision};
    if !palaver::cpu::avx512_vnni() {
        eprintln!("no AVX-512 VNNI on this CPU: the int8 path is not used here");
        return;
    }
    let (files, ids) = encoder_files_and_ids();
    let seqs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let f32s = Encoder::load(&files, &Device::Cpu, Precision::F32).unwrap().embed(&seqs).unwrap();
    let int8 = Encoder::load(&files, &Device::Cpu, Precision::Int8).unwrap();
    let q = int8.embed(&seqs).unwrap();
    for (i, (a, b)) in f32s.iter().zip(&q).enumerate() {
        let cos = dot(a, b);
        assert!(cos > 0.99, "text {i}: int8 vs f32 cosine {cos}");
    }
    // Still independent of the batch: each text alone gives the same row.
    for (i, s) in seqs.iter().enumerate() {
        let alone = int8.embed(&[s]).unwrap();
        assert!(dot(&alone[0], &q[i]) > 0.999999, "text {i} differs alone");
    }
}

/// The default encoder's files and the token ids of TEXTS.
fn encoder_files_and_ids() -> (palaver::models::EncoderFiles, Vec<Vec<u32>>) {
    use palaver::models;
    let dir = common::models_dir();
    models::fetch_models(&[models::DEFAULT_ENCODER], &models::FetchOptions::new(dir.clone())).unwrap();
    let files = models::resolve_encoder(models::DEFAULT_ENCODER, &dir).unwrap();
    let text = palaver::encoder::TextEncoder::new(&files, 256).unwrap();
    let ids = TEXTS.iter().map(|t| text.tokenize(t).unwrap()).collect();
    (files, ids)
}
