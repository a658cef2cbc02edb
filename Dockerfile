# The sidecar in an empty image. Build the static binary first:
#   CGO_ENABLED=0 GOOS=linux go build -trimpath -ldflags='-s -w' -o micro .
#   docker build -t micro .
# The binary needs no libc, no /tmp and no environment, and no /etc but
# the /etc/hosts Docker writes, for host names such as localhost.
FROM scratch
COPY micro /micro
EXPOSE 8081
ENTRYPOINT ["/micro"]
CMD ["sidecar"]
