//! A TCP proxy between a store and its PostgreSQL server, for tests of a database that goes away: the test
//! cuts it (every connection dropped, new ones closed at once) and restores it, or has it lose the connection
//! that carries the next `COMMIT`, before or after the server gets it. The shared server is never touched.

#![allow(clippy::unwrap_used)] // Test support: a panic is the failure report.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

/// Where the next `COMMIT` is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    /// The connection is dropped with the `COMMIT` (and what came with it) unsent: nothing is committed.
    BeforeCommit,
    /// The `COMMIT` reaches the server, which commits; its answer never comes back.
    AfterCommit,
}

#[derive(Default)]
struct State {
    cut: AtomicBool,
    trap: Mutex<Option<Trap>>,
    sprung: AtomicBool,
    conns: Mutex<Vec<AbortHandle>>,
}

pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// A proxy on 127.0.0.1 (a free port) to `target` (`host:port`).
    pub async fn start(target: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if st.cut.load(Ordering::SeqCst) {
                    drop(client); // refused: closed at once
                    continue;
                }
                let task = tokio::spawn(relay(client, target.clone(), st.clone()));
                st.conns.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { addr, state }
    }

    /// A proxy in front of the server a `postgres://user@host:port/db` URL names, and that URL through it.
    pub async fn in_front_of(url: &str) -> (Proxy, String) {
        let rest = url.strip_prefix("postgres://").unwrap();
        let (userhost, name) = rest.rsplit_once('/').unwrap();
        let (user, hostport) = userhost.rsplit_once('@').unwrap();
        let proxy = Proxy::start(hostport.to_string()).await;
        let proxied = format!("postgres://{user}@{}/{name}", proxy.addr);
        (proxy, proxied)
    }

    /// Drops every connection (both ends see it closed) and closes new ones at once.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for c in self.state.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }

    /// Loses the connection that carries the next `COMMIT` (once).
    pub fn trap_next_commit(&self, trap: Trap) {
        self.state.sprung.store(false, Ordering::SeqCst);
        *self.state.trap.lock().unwrap() = Some(trap);
    }

    /// Has the trap been sprung since it was set?
    pub fn sprung(&self) -> bool {
        self.state.sprung.load(Ordering::SeqCst)
    }
}

async fn relay(client: TcpStream, target: String, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(&target).await else {
        return;
    };
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let muted = Arc::new(AtomicBool::new(false));
    let mute = muted.clone();
    let down = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match server_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if mute.load(Ordering::SeqCst) {
                continue; // the answers to a trapped COMMIT's chunk never arrive
            }
            if client_wr.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let up = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let chunk = &buf[..n];
            if chunk.windows(6).any(|w| w == b"COMMIT") {
                let trap = state.trap.lock().unwrap().take();
                match trap {
                    Some(Trap::BeforeCommit) => {
                        state.sprung.store(true, Ordering::SeqCst);
                        return;
                    }
                    Some(Trap::AfterCommit) => {
                        state.sprung.store(true, Ordering::SeqCst);
                        muted.store(true, Ordering::SeqCst);
                        let _ = server_wr.write_all(chunk).await;
                        // Long enough for the server to commit; its answer is dropped.
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        return;
                    }
                    None => {}
                }
            }
            if server_wr.write_all(chunk).await.is_err() {
                return;
            }
        }
    };
    // Either direction ending drops both connections.
    tokio::select! {
        () = down => {}
        () = up => {}
    }
}
