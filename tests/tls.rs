//! https to a model server: a TLS server in the test (a certificate made here, signed by a CA
//! made here) in front of the fake backend. With `--ca-cert` a batch runs over it; without, the
//! server refuses to start and says what is wrong with the certificate.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, wait_exit};
use crate::support::{Api, binary, chat_file};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// A CA, and a certificate for `localhost` / 127.0.0.1 it signed: (CA PEM, leaf DER, key DER).
fn certificates() -> (String, Vec<u8>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "ollama-batch test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("key");
    let leaf = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &issuer)
        .expect("certificate");
    (ca_cert.pem(), leaf.der().to_vec(), key.serialize_der())
}

/// Terminates TLS on a loopback port and passes the bytes on to `target`: its address.
async fn tls_in_front_of(target: SocketAddr, cert: Vec<u8>, key: Vec<u8>) -> SocketAddr {
    use tokio_rustls::rustls;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(cert)],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .expect("TLS server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((sock, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake: nothing to pass on.
                let Ok(mut tls) = acceptor.accept(sock).await else {
                    return;
                };
                if let Ok(mut plain) = tokio::net::TcpStream::connect(target).await {
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_backend_runs_a_batch_with_its_ca_and_is_refused_without() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (ca, cert, key) = certificates();
    let tls = tls_in_front_of(fake.addr, cert, key).await;
    let url = format!("https://localhost:{}", tls.port());
    let dir = tempfile::tempdir().expect("tempdir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).expect("write the CA");

    // Without --ca-cert: no start, and the message says what is wrong and what to do.
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", "openai"])
        .arg("--state")
        .arg(dir.path().join("refused"))
        .args(["--backend-url", &url])
        .env_remove("OLLAMA_BATCH_CA_CERT")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut child = out;
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read");
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("TLS certificate of https://localhost")
            && err.contains("signed by an unknown authority")
            && err.contains("--ca-cert"),
        "{err}"
    );
    assert_eq!(fake.total_calls(), 0);

    // With it: a batch over https, every line answered.
    let state = dir.path().join("state");
    let server = process::spawn(
        &state,
        &url,
        4,
        &["--ca-cert", ca_file.to_str().expect("path")],
    );
    let api = Api::new(&server.addr);
    let done = api
        .run_file(
            chat_file(20, "m", "s"),
            "/v1/chat/completions",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done["request_counts"]["completed"], 20, "{done}");
    assert_eq!(fake.total_calls(), 20);
    let out = api.lines(&done["output_file_id"]).await;
    assert!(out.iter().all(|l| {
        l["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .is_some_and(|c| c.starts_with("echo:score c-"))
    }));

    // A file that is not a certificate is refused by name.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a certificate").expect("write");
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", "openai"])
        .arg("--state")
        .arg(dir.path().join("bad"))
        .args(["--backend-url", &url, "--ca-cert"])
        .arg(&bad)
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--ca-cert"), "{err}");
}
