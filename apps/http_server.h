// HTTP/1.1 transport of `atmoe serve` (Boost.Beast parser over Asio, one IO thread):
// keep-alive, request bodies bounded, idle/slow clients timed out, streamed (chunked)
// replies, and a callback when a client goes away before its reply ended (the server
// cancels that request). Beast stays inside http_server.cpp.
//
// Threads: the handler runs on the IO thread; an HttpExchange may be answered from any
// thread (its methods post to the IO thread). One exchange per request: methods called on
// an exchange whose reply has ended (or whose client is gone) do nothing.
#pragma once
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace atmoe::app {

using HttpHeaders = std::vector<std::pair<std::string, std::string>>;

struct HttpRequest {
  std::string method, target, body, peer;
  HttpHeaders headers;  // names lower-case
  // The header's value, or nullptr.
  const std::string* header(std::string_view lower_name) const;
};

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  int port = 8000;                    // 0: any free port (port() tells which)
  size_t body_limit = size_t(32) << 20;
  double timeout_s = 30;              // reading a request (idle keep-alive included), one write
  int max_connections = 1024;         // beyond: 503 and close (lowered to fit the fd limit)
  // Called with a request's head (method, target, headers; no body yet), on the IO thread:
  // a non-zero status refuses it before its body is read (a wrong key must not make the
  // server buffer 32 MiB). The body: the reply's JSON.
  std::function<int(const HttpRequest& head, std::string& body)> check_head;
  // The error body of the transport's own replies (400, 413, 431, 503, 500).
  std::function<std::string(int status, const std::string& msg)> error_body;
  // Each reply the transport makes itself (for metrics).
  std::function<void(int status)> on_transport_reply;
};

class HttpExchange {
 public:
  virtual ~HttpExchange() = default;
  // A whole response (Content-Length).
  virtual void respond(int status, std::string content_type, std::string body, HttpHeaders extra = {}) = 0;
  // A streamed response: headers now, then chunks, then the end.
  virtual void start_stream(int status, std::string content_type, HttpHeaders extra = {}) = 0;
  virtual void stream(std::string data) = 0;
  virtual void end_stream() = 0;
  // f runs once, on the IO thread, when the client goes away before the reply has ended.
  virtual void on_client_gone(std::function<void()> f) = 0;
};

using HttpHandler = std::function<void(const std::shared_ptr<HttpExchange>&, HttpRequest&)>;

class HttpServer {
 public:
  // Binds and listens (InputError naming host:port when it cannot).
  HttpServer(const HttpServerOptions& o, HttpHandler h);
  ~HttpServer();
  int port() const;
  void start();           // the IO thread
  void stop();            // any thread but the IO thread: every connection closes; joins
  int connections() const;

  struct Impl;  // http_server.cpp

 private:
  std::unique_ptr<Impl> impl_;
};

}  // namespace atmoe::app
