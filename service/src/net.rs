//! TCP settings that let a peer that vanished without a reset (a VM gone, a black-holed link)
//! be noticed in seconds instead of TCP's ~15 minutes of retransmissions.

use std::time::Duration;

/// Keepalive probes after `idle` without traffic, every `idle / 3`, 3 of them; and (Linux)
/// `TCP_USER_TIMEOUT`: data sent and not acknowledged by the peer's kernel for `user_timeout`
/// fails the connection. Errors are returned for logging; the connection works without them.
pub fn detect_dead_peers(
    stream: &tokio::net::TcpStream,
    idle: Duration,
    user_timeout: Duration,
) -> std::io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(idle)
        .with_interval((idle / 3).max(Duration::from_secs(1)))
        .with_retries(3);
    socket.set_tcp_keepalive(&keepalive)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(user_timeout))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keepalive_and_user_timeout_are_set_on_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        detect_dead_peers(&stream, Duration::from_secs(15), Duration::from_secs(30)).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(15));
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(Duration::from_secs(30)));
    }
}
